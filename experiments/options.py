"""The command-line options the example scripts share."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch


def layer_list(text: str) -> list:
    """``"2,-1,features.34"`` -> ``[2, -1, "features.34"]``."""
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def float_pair(text: str) -> tuple[float, float]:
    """``"0.5,1.5"`` -> ``(0.5, 1.5)``."""
    low, high = (float(t) for t in text.split(","))
    return low, high


def example_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """Options of every example: run, training, the loss, data. Training defaults are None
    here and filled by :func:`parse_args` from the example's ``--quick`` or full defaults."""
    parser = argparse.ArgumentParser(
        prog=f"{name}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = parser.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="small configuration: < 10 minutes on 2 CPU cores")
    g.add_argument("--out", default=None, help=f"output folder (default runs/{name}[-quick])")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the batches")
    g = parser.add_argument_group("training (defaults depend on --quick)")
    g.add_argument("--steps", type=int, help="optimisation steps per run")
    g.add_argument("--batch-size", type=int, help="patches per step")
    g.add_argument("--crop", type=int, help="training patch size (clean resolution)")
    g.add_argument("--lr", type=float, help="Adam learning rate (cosine decay to lr/100)")
    g.add_argument("--loss-weight", type=float, help="weight of SemanticStatisticsLoss in the second run")
    g.add_argument("--log-every", type=int, default=10, help="steps between D2SM measurements in the L1 run")
    g = parser.add_argument_group("SemanticStatisticsLoss")
    g.add_argument("--backbone", default="mobilenetv2_100", help="timm model name of the loss's backbone")
    g.add_argument("--backbone-weights", default=None, help="local checkpoint (or package:NAME) for the backbone")
    g.add_argument("--random-backbone", action="store_true",
                   help="random backbone and evaluator weights: smoke tests only, stamped on every output")
    g.add_argument("--layers", type=layer_list, default=None,
                   help="comma-separated feature levels (default: the loss's)")
    g.add_argument("--granularity", default="image", choices=("image", "patch", "location"))
    g.add_argument("--similarity", default="cosine", choices=("cosine", "softmax"))
    g.add_argument("--temperature", type=float, default=0.1, help="temperature of the softmax similarity")
    g.add_argument("--queue-size", type=int, default=0, help="memory queue of earlier batches (image granularity)")
    g = parser.add_argument_group("data (default: built-in photographs, see experiments/data.py)")
    g.add_argument("--data", default=None, help="folder of clean training images")
    g.add_argument("--degraded", default=None, help="folder of real degraded training images paired by file name")
    g.add_argument("--test-data", default=None, help="folder of clean test images (default: last 10%% of --data)")
    g.add_argument("--test-degraded", default=None, help="folder of real degraded test images paired by file name")
    g.add_argument("--eval-size", type=int, help="test images are center-cropped to at most this size")
    g.add_argument("--num-test", type=int, default=None, help="evaluate only the first N test images")
    g.add_argument("--evaluator-weights", default=None, help="local EfficientNet-Lite0 checkpoint (or package:NAME)")
    return parser


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict, full: dict
) -> argparse.Namespace:
    """Parse ``argv``; options left unset take the example's ``quick`` or ``full`` defaults;
    ``--out`` defaults to ``runs/<name>[-quick]``, ``--device auto`` to cuda when available;
    ``--crop`` must be a multiple of ``--scale`` (super-resolution)."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join("runs", parser.prog.removesuffix(".py") + ("-quick" if args.quick else ""))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = getattr(args, "scale", 1)
    if args.crop % scale:
        raise SystemExit(f"--crop {args.crop} must be a multiple of the scale {scale}")
    return args

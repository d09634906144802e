"""One training step with a perceptual loss, with and without D2SM: from one backbone pass
(:class:`~d2sm_loss.perceptual.FeatureLosses`) or as two modules.

The step: the examples' DnCNN on noisy images, ``L1 + feature losses``, backward, Adam. Cases
(column ``case``), all with VGG19 (random weights; the cost does not depend on them):

- ``l1+perceptual``: the reference, a perceptual module alone (``FeatureLosses`` with
  ``d2sm_weight=0``: the same computation as BasicSR's ``PerceptualLoss``, see the tests);
- ``l1+perceptual+d2sm one pass``: ``FeatureLosses`` with the perceptual and the D2SM term
  (D2SM at conv5_4 before its ReLU);
- ``l1+perceptual+d2sm two modules``: the perceptual module plus a separate
  ``SemanticStatisticsLoss`` (its own backbone passes);
- ``basicsr l1+perceptual`` and ``basicsr l1+perceptual+d2sm`` (when BasicSR is installed,
  ``--basicsr``): BasicSR's own ``PerceptualLoss`` and ``PerceptualD2SMLoss`` in its
  ``perceptual_opt`` slot, the pixel L1 in ``pixel_opt``, stepped by ``SRModel.optimize_parameters``
  on a tiny MSRResNet; their reference is the BasicSR ``PerceptualLoss`` row.

Layer configurations (``--layers``): ``esrgan`` (BasicSR's ESRGAN configs: conv5_4 weight 1)
and ``redux`` (traiNNer-redux's default: conv1_2, conv2_2 at 0.1, conv3_4, conv4_4, conv5_4 at 1).
All cases of one size and configuration run side by side in interleaved rounds;
``paired_ratio_vs_ref`` is the median per-round ratio to the reference. Rows go to
``<out>/perceptual_step.csv``::

    OMP_NUM_THREADS=2 python -m benchmarks.perceptual_step --basicsr     # CPU: 4x96
    python -m benchmarks.perceptual_step --quick                         # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import measure, results
from benchmarks.loss_overhead import parse_size
from d2sm_loss import SemanticStatisticsLoss
from d2sm_loss.perceptual import FeatureLosses
from experiments.models import DnCNN

CSV_NAME = "perceptual_step.csv"
FIELDS = results.META_FIELDS + [
    "case", "layers", "batch", "height", "width", "net", "d2sm_weight", "repeats", "warmup", "status",
    "time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms", "peak_mem_mb", "mem_method",
    "ratio_time_vs_ref", "paired_ratio_vs_ref", "ratio_vs", "first_call_s", "note",
]
KEY = ("device", "threads", "net", "batch", "height", "width", "layers", "case")
LAYERS = {
    "esrgan": {"conv5_4": 1.0},
    "redux": {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0},
}
D2SM_WEIGHT = 0.1
REFERENCE = "l1+perceptual"
BASICSR_REFERENCE = "basicsr l1+perceptual"


def feature_losses(layers: dict[str, float], d2sm_weight: float, weights: dict[str, Any], device) -> FeatureLosses:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FeatureLosses("vgg19", layers, d2sm_weight=d2sm_weight, checkpoint=weights,
                             mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).to(device)


def step_case(name: str, losses: list[Any], net: torch.nn.Module, size: tuple[int, int, int], device) -> measure.Case:
    """One step of ``net``: ``L1 + sum of every term of every loss``, backward, Adam."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    batch, height, width = size

    def prepare() -> tuple[torch.Tensor, torch.Tensor]:
        clean = torch.rand(batch, 3, height, width, device=device)
        return clean + 0.1 * torch.randn_like(clean), clean

    def run(state: tuple[torch.Tensor, torch.Tensor]) -> None:
        noisy, clean = state
        optimizer.zero_grad(set_to_none=True)
        restored = net(noisy)
        total = F.l1_loss(restored, clean)
        for loss in losses:
            value = loss(restored, clean)
            total = total + (sum(value.values()) if isinstance(value, dict) else D2SM_WEIGHT * value)
        total.backward()
        optimizer.step()

    return measure.Case(name, prepare, run)


def plain_cases(layers: dict[str, float], net_template: torch.nn.Module, size, device) -> list[measure.Case]:
    torch.manual_seed(0)
    import timm

    weights = timm.create_model("vgg19", pretrained=False).state_dict()
    perceptual = feature_losses(layers, 0.0, weights, device)
    one_pass = feature_losses(layers, D2SM_WEIGHT, weights, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d2sm = SemanticStatisticsLoss("vgg19", checkpoint=weights, mean=(0.485, 0.456, 0.406),
                                      std=(0.229, 0.224, 0.225)).to(device)
    nets = [_copy(net_template) for _ in range(3)]
    return [
        step_case(REFERENCE, [perceptual], nets[0], size, device),
        step_case("l1+perceptual+d2sm one pass", [one_pass], nets[1], size, device),
        step_case("l1+perceptual+d2sm two modules", [perceptual, d2sm], nets[2], size, device),
    ]


def basicsr_cases(layers: dict[str, float], size, device, folder: Path) -> list[measure.Case]:
    """BasicSR's SRModel.optimize_parameters with PerceptualLoss, then with PerceptualD2SMLoss;
    VGG19 random weights at BasicSR's path under ``folder`` (its VGGFeatureExtractor reads it)."""
    import os

    import torchvision
    from basicsr.models.sr_model import SRModel

    import d2sm_loss.integrations.basicsr as adapter  # noqa: F401  (registers the losses)

    path = folder / "experiments" / "pretrained_models" / "vgg19-dcbb9e9d.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg19().state_dict(), path)
    batch, height, width = size
    cases = []
    here = os.getcwd()
    os.chdir(folder)
    try:
        for name, perceptual in (
            (BASICSR_REFERENCE, {"type": "PerceptualLoss", "layer_weights": layers}),
            ("basicsr l1+perceptual+d2sm", {"type": "PerceptualD2SMLoss", "layer_weights": layers,
                                             "d2sm_weight": D2SM_WEIGHT}),
        ):
            opt = {
                "is_train": True, "dist": False, "num_gpu": 0, "scale": 2, "rank": 0, "world_size": 1,
                "path": {"pretrain_network_g": None, "strict_load_g": True, "resume_state": None,
                         "models": str(folder), "training_states": str(folder)},
                "network_g": {"type": "MSRResNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 16, "num_block": 2,
                              "upscale": 2},
                "train": {"optim_g": {"type": "Adam", "lr": 1e-4}, "scheduler": {"type": "MultiStepLR",
                          "milestones": [10**6], "gamma": 0.5}, "ema_decay": 0,
                          "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0},
                          "perceptual_opt": perceptual},
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = SRModel(opt)

            def prepare(model=model) -> None:
                gt = torch.rand(batch, 3, height, width)
                lq = F.interpolate(gt, scale_factor=0.5, mode="bicubic", align_corners=False).clamp(0, 1)
                model.feed_data({"lq": lq, "gt": gt})

            info = {"net": "MSRResNet16x2"}
            cases.append(measure.Case(name, prepare, lambda _, model=model: model.optimize_parameters(1), info))
    finally:
        os.chdir(here)
    return cases


def _copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module)


def write(cases: list[measure.Case], base: dict[str, Any], csv: results.ResultsCSV) -> None:
    refs = {case.name: case for case in cases if case.name in (REFERENCE, BASICSR_REFERENCE)}
    for case in cases:
        row = {**base, **case.info, "case": case.name, "status": case.status}
        if case.ok and case.times:
            row.update(measure.summarize(case.times), peak_mem_mb=case.peak_bytes / 2**20, mem_method=case.mem_method,
                       first_call_s=case.first_call_s)
            ref = refs.get(BASICSR_REFERENCE if case.name.startswith("basicsr") else REFERENCE)
            if ref is not None and ref.ok and ref.times:
                row.update(ratio_vs=ref.name, ratio_time_vs_ref=statistics.median(case.times) / statistics.median(ref.times),
                           paired_ratio_vs_ref=measure.paired_ratio(case, ref))
        csv.write(row)
        ratio = row.get("paired_ratio_vs_ref")
        print(f"{row['layers']:<7} {case.name:<34}"
              + (f"{row['time_median_ms']:>9.1f} ms (IQR {row['time_iqr_ms']:.1f})" if "time_median_ms" in row
                 else row["status"])
              + (f"  paired ratio {ratio:.3f}" if isinstance(ratio, float) else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2 at 32x32, DnCNN 3x8, 2 repeats")
    parser.add_argument("--sizes", type=parse_size, nargs="+", help="BxS or BxHxW (default 4x96)")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=None, help="default: esrgan redux")
    parser.add_argument("--basicsr", action="store_true", help="also BasicSR's optimize_parameters (needs basicsr)")
    parser.add_argument("--depth", type=int, default=None, help="DnCNN layers (default 17)")
    parser.add_argument("--width", type=int, default=None, help="DnCNN channels (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 2, quick 1)")
    results.add_run_arguments(parser, CSV_NAME)
    args = parser.parse_args(argv)
    quick = args.quick
    sizes = args.sizes or ([(2, 32, 32)] if quick else [(4, 96, 96)])
    layer_sets = args.layers or (["esrgan"] if quick else ["esrgan", "redux"])
    depth, width = args.depth or (3 if quick else 17), args.width or (8 if quick else 64)
    repeats, warmup = args.repeats or (2 if quick else 9), args.warmup or (1 if quick else 2)
    device, meta = results.start_run(args, parser)
    csv = results.ResultsCSV(args.out / CSV_NAME, FIELDS, KEY)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    template = DnCNN(depth, width).to(device)
    for size in sizes:
        for name in layer_sets:
            cases = plain_cases(LAYERS[name], template, size, device)
            with tempfile.TemporaryDirectory() as folder:  # BasicSR's VGG file, outside the results
                if args.basicsr and device.type == "cpu":
                    cases += basicsr_cases(LAYERS[name], size, device, Path(folder))
                measure.measure(cases, repeats, warmup, device)
            base = {**meta, "layers": name, "batch": size[0], "height": size[1], "width": size[2],
                    "net": f"DnCNN{depth}x{width}", "d2sm_weight": D2SM_WEIGHT, "repeats": repeats, "warmup": warmup,
                    "note": args.note}
            write(cases, base, csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

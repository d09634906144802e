"""The similarity-KL statistic alone: time and peak memory against N and D.

Implementations: ``reference`` (the plain O(N^2)-memory formulation), ``torch`` (the
streaming autograd function) and ``triton`` (the fused kernels, CUDA only), all through
:func:`d2sm_loss.functional.similarity_kl`; and ``baseline``, the dense contextual-loss-style
peer :func:`benchmarks.baselines.dense_similarity_kl`. Modes: ``forward`` (restored rows
require grad), ``backward`` (of a mean-reduced loss whose forward ran untimed) and
``forward+backward``.

One row per point (implementation, mode, G groups, N rows, D features), written as soon
as it is measured: median time and spread over ``--repeats`` calls on fresh ``randn``
inputs, peak memory above the inputs (CPU: each point in a forked child,
:class:`benchmarks.measure.RssPeak`; CUDA: allocator statistics), ``OOM`` (larger N are
then skipped for that implementation, mode, G and D) or ``error: ...``. On the CPU an
allocation limit (``--cpu-memory-limit-gb``, default 75 % of available memory) turns an
out-of-memory into an error instead of the OOM killer.

TFLOP/s: ``tflops_nominal`` counts ``4 N^2 D`` FLOPs per group forward, ``12 N^2 D``
backward, ``16 N^2 D`` both, for every implementation alike; Triton rows also record what
their kernels execute (``flops_executed_n2d``, in units of ``N^2 D``: backward
``4 ceil(D / block_dout) + 2``) and ``tflops_executed``. On CUDA a float32 8192^2
``torch.matmul`` gives the ceiling (row ``matmul_fp32``, or ``matmul_tf32`` with
``--tf32``) and ``pct_of_ceiling``.

The paper's image-granularity shape (G = 1, N = 232: 8 images + 224 queue rows,
D = 100352: VGG19 conv5_4 at 224 x 224) is ``--paper-point`` (in the full default sweep).

Judge and plot the CSV with ``benchmarks/judge.py`` and ``benchmarks/plot.py``::

    python -m benchmarks.statistics_kernel --quick            # CPU smoke run, < 1 minute
    python -m benchmarks.statistics_kernel                    # full sweep (CUDA; moderate on CPU)
    python -m benchmarks.statistics_kernel --g 1 --n 4096 --d 64 --modes forward+backward
    python -m benchmarks.statistics_kernel --paper-point only
    python -m benchmarks.statistics_kernel --implementations triton --g 8 --n 4096 --d 256 --profile prof.txt
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch

from benchmarks import measure, results
from benchmarks.baselines import dense_similarity_kl
from d2sm_loss._compat import tf32_allowed
from d2sm_loss.functional import similarity_kl

CSV_NAME = "statistics_kernel.csv"
IMPLEMENTATIONS = ("reference", "streaming", "triton", "baseline")
MODES = ("forward", "backward", "forward+backward")
FIELDS = results.META_FIELDS + [
    "implementation", "mode", "G", "N", "D", "kernel", "temperature", "include_self", "dtype", "matmul_precision",
    "repeats", "status", "time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms",
    "peak_mem_mb", "mem_method", "tflops_nominal", "pct_of_ceiling", "flops_executed_n2d", "tflops_executed", "note",
]
KEY = ("device", "threads", "implementation", "mode", "G", "N", "D", "kernel", "include_self", "dtype",
       "matmul_precision")
#: Nominal FLOPs per group in units of N^2 D, the same for every implementation.
FLOPS_PER_GROUP = {"forward": 4, "backward": 12, "forward+backward": 16}
PAPER_POINT = (1, 8 + 224, 512 * 14 * 14)
PAPER_NOTE = "paper image granularity: N=232 (8 images + 224 queue rows), D=100352 (VGG19 conv5_4 at 224x224)"
PAPER_IMPLEMENTATIONS = ("reference", "streaming", "triton")


@dataclass(frozen=True)
class Point:
    """One (G, N, D) of the sweep with the modes and implementations measured there."""

    g: int
    n: int
    d: int
    modes: tuple[str, ...]
    implementations: tuple[str, ...]
    note: str = ""
    max_repeats: int | None = None  # cap on the timed calls (the slow D = 100352 point)


def kl_case(impl: str, mode: str, g: int, n: int, d: int, similarity: str = "cosine", temperature: float = 0.1,
            include_self: bool = True, device: torch.device = torch.device("cpu")) -> measure.Case:
    """The statistic of ``impl`` in ``mode`` on fresh (G, N, D) ``randn`` rows."""
    options = {"similarity": similarity, "temperature": temperature, "include_self": include_self}
    if impl == "baseline":
        loss_fn = functools.partial(dense_similarity_kl, **options)
    else:
        loss_fn = functools.partial(similarity_kl, reduction="mean", implementation=impl, **options)

    def inputs():
        return (torch.randn(g, n, d, device=device, requires_grad=True), torch.randn(g, n, d, device=device))

    name = f"{impl} {mode}"
    if mode == "forward":
        return measure.Case(name, inputs, lambda state: loss_fn(*state))
    if mode == "backward":
        def prepare():
            x, y = inputs()
            return x, loss_fn(x, y)

        return measure.Case(name, prepare, lambda state: state[1].backward())
    return measure.Case(name, inputs, lambda state: loss_fn(*state).backward())


def figures(case: measure.Case) -> dict[str, Any]:
    if not case.ok:
        return {"status": case.status}
    return {"status": "ok", "peak_mem_mb": case.peak_bytes / 2**20, "mem_method": case.mem_method,
            **measure.summarize(case.times)}


def measure_point_cpu(impl: str, mode: str, g: int, n: int, d: int, options: dict, repeats: int) -> dict[str, Any]:
    """In a forked child: a small call first (lazy initialisation), then one memory-probed
    call at full size (which also warms it up), then the timed calls."""
    cpu = torch.device("cpu")
    small = kl_case(impl, mode, 1, min(n, 64), min(d, 64), device=cpu, **options)
    small.run(small.prepare())
    case = kl_case(impl, mode, g, n, d, device=cpu, **options)
    measure.guarded(case, lambda: measure.peak_memory(case, cpu))
    measure.measure_rounds([case], repeats, cpu)
    return figures(case)


def measure_point_cuda(impl: str, mode: str, g: int, n: int, d: int, options: dict, repeats: int) -> dict[str, Any]:
    case = kl_case(impl, mode, g, n, d, device=torch.device("cuda"), **options)
    measure.measure([case], repeats, warmup=3, device=torch.device("cuda"))
    return figures(case)


def sweep_points(args: argparse.Namespace, on_cuda: bool, impls: list[str]) -> list[Point]:
    """The regular sweep (N growing within each G, D), then the paper point if asked."""
    if args.paper_point == "only":
        grid: set[tuple[int, int, int]] = set()
    elif args.n or args.d or args.g:
        grid = set(product(args.g or [1], args.n or [1024], args.d or [64]))
    elif args.quick:
        grid = {(1, 256, 64), (1, 1024, 64)}
    elif on_cuda:
        grid = {(g, n, d) for g in (1, 8) for n in (256, 1024, 2048, 4096, 8192, 16384) for d in (64, 256)}
        grid |= {(g, 4096, d) for g in (1, 8) for d in (64, 128, 256, 512)}
    else:
        grid = {(1, n, d) for n in (256, 1024, 2048, 4096, 8192) for d in (64, 256)}
        grid |= {(1, 4096, d) for d in (128, 512)}
    points = [Point(g, n, d, tuple(args.modes), tuple(impls)) for g, n, d in sorted(grid, key=lambda p: (p[0], p[2], p[1]))]
    paper = args.paper_point in ("yes", "only") or (
        args.paper_point == "auto" and not (args.quick or args.n or args.d or args.g))
    paper_impls = tuple(i for i in impls if i in PAPER_IMPLEMENTATIONS)
    if paper and paper_impls:  # last: a run cut short keeps the regular sweep's rows
        points.append(Point(*PAPER_POINT, modes=("forward+backward",), implementations=paper_impls,
                            note=PAPER_NOTE, max_repeats=5 if on_cuda else 3))
    return points


def triton_unavailable_reason(on_cuda: bool) -> str | None:
    if not on_cuda:
        return "no CUDA device (the Triton kernels need a GPU; CPU interpretation is for tests only)"
    from d2sm_loss.functional import _triton_error

    return _triton_error()


def triton_executed_n2d(mode: str, d: int) -> float | None:
    """FLOPs the Triton kernels execute per group at float32, in units of N^2 D."""
    try:
        from d2sm_loss.ops.triton_config import choose_block_config
    except ImportError:  # Triton not installed
        return None
    block_dout = choose_block_config(d, torch.float32, interpreted=False).backward.block_dout
    backward = 4 * math.ceil(d / block_dout) + 2
    return {"forward": 4, "backward": backward, "forward+backward": 4 + backward}[mode]


def measure_ceiling(meta: dict[str, Any], note: str) -> tuple[float | None, dict[str, Any]]:
    """The ``torch.matmul`` ceiling (TFLOP/s) under this run's float32 precision, and its row."""
    precision = "tf32" if tf32_allowed() else "fp32"
    row = {**meta, "implementation": f"matmul_{precision}", "mode": "forward", "G": 1, "N": 8192, "D": 8192,
           "kernel": "matmul", "include_self": "-", "dtype": "float32", "matmul_precision": precision, "repeats": 10,
           "note": f"torch.matmul ceiling, float32 inputs, {precision} products {note}".strip()}
    try:
        ceiling = measure.cuda_matmul_tflops(8192)
    except Exception as error:
        row["status"] = "OOM" if measure.is_oom(error) else results.error_status(error)
        return None, row
    row.update(status="ok", tflops_nominal=ceiling, tflops_executed=ceiling, pct_of_ceiling=100.0)
    return ceiling, row


def add_flops(row: dict[str, Any], ceiling: float | None) -> None:
    g, n, d, mode = row["G"], row["N"], row["D"], row["mode"]
    seconds = row["time_median_ms"] * 1e-3
    row["tflops_nominal"] = FLOPS_PER_GROUP[mode] * g * n * n * d / seconds / 1e12
    if ceiling:
        row["pct_of_ceiling"] = 100.0 * row["tflops_nominal"] / ceiling
    executed = triton_executed_n2d(mode, d) if row["implementation"] == "triton" else None
    if executed is not None:
        row["flops_executed_n2d"] = executed
        row["tflops_executed"] = executed * g * n * n * d / seconds / 1e12


def profile_point(impl: str, g: int, n: int, d: int, options: dict, device: torch.device, path: Path,
                  calls: int = 3) -> str:
    """A ``torch.profiler`` table of ``calls`` forward + backward calls of ``impl`` at one point
    (after a warm-up call, so compilation is not in it), sorted by device time; written to
    ``path`` and returned."""
    from torch.profiler import ProfilerActivity, profile

    case = kl_case(impl, "forward+backward", g, n, d, device=device, **options)
    case.run(case.prepare())  # warm-up: Triton compilation, lazy initialisation
    states = [case.prepare() for _ in range(calls)]
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for state in states:
            case.run(state)
        if on_cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if on_cuda else "cpu_time_total"
    title = (f"torch.profiler: similarity_kl {impl}, forward + backward x {calls}, G={g} N={n} D={d}, "
             f"{options['similarity']}, float32, {'tf32' if tf32_allowed() else 'fp32'} products, sorted by {sort}")
    text = title + "\n" + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced CPU sweep (< 1 minute), for CI")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--n", type=int, nargs="+", help="rows per group (overrides the sweep)")
    parser.add_argument("--d", type=int, nargs="+", help="features (overrides the sweep)")
    parser.add_argument("--g", type=int, nargs="+", help="groups (overrides the sweep)")
    parser.add_argument("--paper-point", choices=("auto", "yes", "no", "only"), default="auto",
                        help="G=1, N=232, D=100352: auto = in the full default sweep only")
    parser.add_argument("--kernel", choices=("cosine", "softmax"), default="cosine")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--exclude-self", action="store_true", help="include_self=False")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 3 quick, 7 CPU, 20 CUDA)")
    parser.add_argument("--cpu-memory-limit-gb", type=float, default=None,
                        help="allocation limit per CPU point (default 75%% of available memory)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 products in every implementation")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="instead of measuring: a torch.profiler table of the first implementation at the first "
                             "G, N and D given, written to FILE")
    results.add_run_arguments(parser, CSV_NAME)
    args = parser.parse_args(argv)
    device, meta = results.start_run(args, parser)
    on_cuda = device.type == "cuda"
    repeats = args.repeats or (3 if args.quick else 20 if on_cuda else 7)
    options = {"similarity": args.kernel, "temperature": args.temperature, "include_self": not args.exclude_self}
    impls = list(args.implementations)
    reason = triton_unavailable_reason(on_cuda) if "triton" in impls else None
    if reason is not None:
        print(f"note: skipping implementation 'triton': {reason}")
        impls.remove("triton")
    limit = int(args.cpu_memory_limit_gb * 2**30) if args.cpu_memory_limit_gb else \
        int(0.75 * (measure.available_memory_bytes() or 0)) or None
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    precision = "tf32" if tf32_allowed() else "fp32"
    if args.profile is not None:
        if not impls:
            parser.error("--profile: none of the implementations asked for can run here")
        point = (args.g or [8 if on_cuda else 1])[0], (args.n or [4096])[0], (args.d or [256])[0]
        print(profile_point(impls[0], *point, options, device, args.profile))
        return 0
    csv = results.ResultsCSV(args.out / CSV_NAME, FIELDS, KEY)
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | "
          f"threads {meta['threads']} | repeats {repeats} | {precision} products")
    ceiling = None
    if on_cuda:
        ceiling, row = measure_ceiling(meta, args.note)
        print(f"matmul ceiling ({precision}): {row.get('tflops_nominal', row['status'])}")
        csv.write(row)
    gave_oom: set[tuple] = set()
    for point in sweep_points(args, on_cuda, impls):
        point_repeats = min(repeats, point.max_repeats or repeats)
        for impl, mode in product(point.implementations, point.modes):
            where = f"{impl:>9} {mode:>16} G={point.g} N={point.n:>6} D={point.d:>6}"
            if (impl, mode, point.g, point.d) in gave_oom:
                print(f"{where} skipped (OOM at smaller N)")
                continue
            work = (impl, mode, point.g, point.n, point.d, options, point_repeats)
            try:
                result = measure_point_cuda(*work) if on_cuda else \
                    measure.run_in_child(functools.partial(measure_point_cpu, *work), memory_limit_bytes=limit)
            except Exception as error:  # outside the per-point guards (e.g. fork failed): record, go on
                result = {"status": "OOM" if measure.is_oom(error) else results.error_status(error)}
            row = {**meta, "implementation": impl, "mode": mode, "G": point.g, "N": point.n, "D": point.d,
                   "kernel": args.kernel, "temperature": args.temperature if args.kernel == "softmax" else "",
                   "include_self": options["include_self"], "dtype": "float32", "matmul_precision": precision,
                   "repeats": point_repeats, "note": "; ".join(filter(None, [point.note, args.note])), **result}
            row["status"] = (row["status"].splitlines() or ["error"])[0]
            if row["status"].startswith("OOM"):
                gave_oom.add((impl, mode, point.g, point.d))
            if row["status"] == "ok":
                add_flops(row, ceiling)
                print(f"{where} {row['time_median_ms']:>10.3f} ms (IQR {row['time_iqr_ms']:.3f}) "
                      f"{row['peak_mem_mb']:>9.1f} MiB {row['tflops_nominal']:.3g} TFLOP/s")
            else:
                print(f"{where} {row['status']}")
            csv.write(row)
    print(f"appended {len(csv.written)} rows to {csv.path}; judge: python -m benchmarks.judge --results {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the similarity-KL statistic alone: time and peak memory against N and D.

Implementations compared (all through :func:`d2sm_loss.functional.similarity_kl` except
the baseline):

- ``reference``: the plain O(N^2)-memory formulation (``implementation="reference"``).
- ``torch``: the streaming PyTorch autograd function (``implementation="torch"``).
- ``triton``: the fused Triton kernels (``implementation="triton"``), CUDA only; skipped
  with a note when Triton or a GPU is unavailable.
- ``baseline``: a contextual-loss-style peer written below: the full N x N cosine matrix,
  normalised per row, reduced with plain autograd (what the authors' code and most
  similarity-matching losses do). The peer to beat.

Modes: ``forward`` (restored features require grad), ``backward`` (the backward of a
mean-reduced loss whose forward ran untimed) and ``forward+backward``.

Measurements per point (G groups, N rows, D features, float32, cosine kernel unless
``--kernel``), inputs from ``torch.randn``, fresh for every repeat:

- time: median and spread (IQR, min, max) over ``--repeats`` calls. CPU:
  ``time.perf_counter`` around one call at a time; CUDA: CUDA events after warm-up
  and synchronisation.
- peak memory above the inputs (and, for ``backward``, above the state saved by the
  forward). CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
  minus the memory allocated before the call. CPU: each point runs in a freshly forked
  child process; after a small warm-up call (so lazy initialisation is not counted),
  the kernel's resident-set high-water mark is reset (``/proc/self/clear_refs``) and the
  figure is VmHWM after the call minus VmRSS before it (see ``_common.RssPeak``).
- out of memory: recorded as status ``OOM``; larger N are then skipped for that
  implementation, configuration and mode. On the CPU an allocation limit
  (``--cpu-memory-limit-gb``, default 75% of available memory) turns OOM into an error.
  Any other error at a point (a Triton compilation or launch failure, a CUDA error) is
  recorded as status ``error: <Type>: <first line>`` (traceback on stderr) and the sweep
  goes on.
- TFLOP/s, column ``tflops_nominal``: one nominal count for every implementation, so that
  rows compare: ``4 N^2 D`` FLOPs per group forward, ``12 N^2 D`` backward, ``16 N^2 D``
  both (issue 3's count; older rows of the CSV call this column ``tflops``). It is not
  what every implementation executes: the Triton backward executes
  ``(4 ceil(D / block_dout) + 2) N^2 D`` (``block_dout`` from
  :func:`d2sm_loss.ops.triton_kernels.choose_block_config`), recorded per Triton row as
  ``flops_executed_n2d`` (in units of ``N^2 D`` per group) with ``tflops_executed``; the
  streaming PyTorch backward does ``8 N^2 D``. On CUDA a ``torch.matmul`` of two float32
  8192^2 matrices gives the ceiling, row ``matmul_fp32`` (exact float32) or
  ``matmul_tf32`` (TF32 allowed, e.g. ``--tf32``), and ``pct_of_ceiling`` is the nominal
  figure in % of it.
- The paper's image-granularity shape (G = 1, N = 232: 8 images + 224 queue rows,
  D = 100352: VGG19 conv5_4 at 224 x 224, 512 * 14 * 14), forward + backward, for the
  reference, streaming and Triton paths (``--paper-point``; in the default sweep, not in
  ``--quick``). Triton is expected to be slow there (its backward recomputes the tiles for
  every 128 gradient columns); ``implementation="auto"`` sends such rows to the streaming
  path.

After the sweep the script prints the largest N each implementation ran (``>= N (no OOM
in sweep)`` when nothing ran out of memory) and a PASS/FAIL line for each target of
issues 3 and 5 whose points this run measured (see :func:`evaluate_targets`).

Every run appends its rows to ``<out>/statistics_kernel.csv`` (device, torch and triton
versions, commit, date, configuration, figures) and redraws the PNG plots (time and
memory against N, one line per implementation, newest figure per point) from the CSV.

Usage::

    python benchmarks/statistics_kernel.py --quick            # CPU smoke run, < 1 minute
    python benchmarks/statistics_kernel.py                    # full sweep on CUDA; moderate on CPU
    python benchmarks/statistics_kernel.py --n 4096 --d 64 --g 1 --modes forward+backward
    python benchmarks/statistics_kernel.py --paper-point only --device cuda   # just the D = 100352 point
    python benchmarks/statistics_kernel.py --plot-only         # redraw the PNGs from the CSV
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import traceback
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402

from benchmarks import _common as common  # noqa: E402
from d2sm_loss._compat import tf32_allowed  # noqa: E402
from d2sm_loss.functional import similarity_kl  # noqa: E402

CSV_NAME = "statistics_kernel.csv"
IMPLEMENTATIONS = ("reference", "torch", "triton", "baseline")
MODES = ("forward", "backward", "forward+backward")
FIELDS = [
    "date", "commit", "device", "torch", "triton", "python", "threads",
    "implementation", "mode", "G", "N", "D", "kernel", "temperature", "include_self", "dtype",
    "repeats", "status", "time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms",
    "peak_mem_mb", "mem_method", "tflops_nominal", "pct_of_ceiling", "flops_executed_n2d", "tflops_executed",
    "note",
]
#: Nominal FLOPs per group in units of N^2 D (issue 3's count), the same for every implementation.
FLOPS_PER_GROUP = {"forward": 4, "backward": 12, "forward+backward": 16}
#: The paper's image granularity: 8 images + a queue of 224 rows, VGG19 conv5_4 at 224 x 224.
PAPER_POINT = (1, 8 + 224, 512 * 14 * 14)
PAPER_NOTE = "paper image granularity: N=232 (8 images + 224 queue rows), D=100352 (VGG19 conv5_4 at 224x224)"
PAPER_IMPLEMENTATIONS = ("reference", "torch", "triton")


# --- the contextual-loss-style baseline ------------------------------------------------


def baseline_similarity_kl(x: torch.Tensor, y: torch.Tensor, *, kernel: str = "cosine",
                           temperature: float = 0.1, include_self: bool = True) -> torch.Tensor:
    """Mean per-row KL(p_clean || p_restored) the straightforward way, like the authors'
    code: full N x N cosine matrices, kernel, row normalisation, elementwise log with a
    1e-6 guard, reduction. Memory O(G N^2), several matrices kept for autograd."""
    xn = torch.nn.functional.normalize(x, dim=-1)
    cx = xn @ xn.transpose(-1, -2)
    with torch.no_grad():
        yn = torch.nn.functional.normalize(y, dim=-1)
        cy = yn @ yn.transpose(-1, -2)
    if kernel == "cosine":
        kx, ky = (cx + 1.0) / 2.0, (cy + 1.0) / 2.0
    else:
        kx, ky = torch.exp((cx - 1.0) / temperature), torch.exp((cy - 1.0) / temperature)
    if not include_self:
        keep = 1.0 - torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)
        kx, ky = kx * keep, ky * keep
    px = kx / kx.sum(dim=-1, keepdim=True)
    py = ky / ky.sum(dim=-1, keepdim=True)
    return (py * torch.log((py + 1e-6) / (px + 1e-6))).sum(dim=-1).mean()


def make_loss_fn(impl: str, kernel: str, temperature: float, include_self: bool) -> Callable:
    if impl == "baseline":
        return lambda x, y: baseline_similarity_kl(x, y, kernel=kernel, temperature=temperature,
                                                   include_self=include_self)
    return lambda x, y: similarity_kl(x, y, kernel=kernel, temperature=temperature, include_self=include_self,
                                      reduction="mean", implementation=impl)


def make_case(impl: str, mode: str, g: int, n: int, d: int, kernel: str, temperature: float,
              include_self: bool, device: torch.device, dtype: torch.dtype):
    """``(prepare, run)``: ``prepare()`` builds fresh inputs (and, for ``backward``, runs
    the forward); ``run(state)`` is the measured work."""
    loss_fn = make_loss_fn(impl, kernel, temperature, include_self)

    def inputs():
        x = torch.randn(g, n, d, device=device, dtype=dtype, requires_grad=True)
        y = torch.randn(g, n, d, device=device, dtype=dtype)
        return x, y

    if mode == "forward":
        return inputs, lambda state: loss_fn(*state)
    if mode == "backward":
        def prepare():
            x, y = inputs()
            return x, loss_fn(x, y)

        return prepare, lambda state: state[1].backward()

    def run(state):
        loss_fn(*state).backward()

    return inputs, run


# --- one point ------------------------------------------------------------------------


def measure_point_cpu(impl, mode, g, n, d, kernel, temperature, include_self, dtype, repeats) -> dict[str, Any]:
    """Runs inside a forked child: warm-up, one memory-measured call, then timing."""
    device = torch.device("cpu")
    small = make_case(impl, mode, 1, min(n, 64), min(d, 64), kernel, temperature, include_self, device, dtype)
    small[1](small[0]())  # lazy initialisation (dispatch, BLAS) outside the measurement
    prepare, run = make_case(impl, mode, g, n, d, kernel, temperature, include_self, device, dtype)
    state = prepare()
    with common.RssPeak() as peak:
        run(state)
    del state
    times = common.time_cpu(prepare, run, repeats=repeats, warmup=0)
    return {"status": "ok", "peak_mem_mb": peak.peak_bytes / 2**20, "mem_method": peak.method,
            "threads": torch.get_num_threads(), **common.summarize(times)}


def measure_point_cuda(impl, mode, g, n, d, kernel, temperature, include_self, dtype, repeats) -> dict[str, Any]:
    device = torch.device("cuda")
    prepare, run = make_case(impl, mode, g, n, d, kernel, temperature, include_self, device, dtype)
    try:
        run(prepare())  # compilation / autotuning outside the measurement
        state = prepare()
        peak = common.cuda_peak_bytes(functools.partial(run, state))
        del state
        times = common.time_cuda(prepare, run, repeats=repeats, warmup=2)
    except Exception as error:
        if common.is_oom(error):
            return {"status": "OOM"}
        traceback.print_exc()  # recorded as a row; the sweep goes on
        return {"status": common.error_status(error)}
    finally:
        try:
            torch.cuda.empty_cache()
        except Exception:  # a broken CUDA context: the next point reports its own error
            pass
    return {"status": "ok", "peak_mem_mb": peak / 2**20, "mem_method": "cuda-max-allocated",
            **common.summarize(times)}


# --- sweeps -----------------------------------------------------------------------------


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


def sweep_configs(args, on_cuda: bool) -> list[tuple[int, int, int]]:
    """(G, N, D) points of the regular sweep, sorted so that N grows within each (G, D)."""
    if args.paper_point == "only":
        return []
    if args.n or args.d or args.g:
        ns = args.n or [1024]
        ds = args.d or [64]
        gs = args.g or [1]
        points = set(product(gs, ns, ds))
    elif args.quick:
        points = {(1, 256, 64), (1, 1024, 64)}
    elif on_cuda:
        ns = [256, 1024, 2048, 4096, 8192, 16384]
        points = {(g, n, d) for g in (1, 8) for n in ns for d in (64, 256)}
        points |= {(g, 4096, d) for g in (1, 8) for d in (64, 128, 256, 512)}
    else:
        ns = [256, 1024, 2048, 4096, 8192]
        points = {(1, n, d) for n in ns for d in (64, 256)}
        points |= {(1, 4096, d) for d in (128, 512)}
    return sorted(points, key=lambda p: (p[0], p[2], p[1]))


def wants_paper_point(args) -> bool:
    """``--paper-point``: ``auto`` adds it to the full default sweep only (not to
    ``--quick`` or an explicit ``--n/--d/--g`` sweep)."""
    if args.paper_point == "auto":
        return not (args.quick or args.n or args.d or args.g)
    return args.paper_point in ("yes", "only")


def sweep_points(args, on_cuda: bool, impls: list[str]) -> list[Point]:
    points = [Point(g, n, d, tuple(args.modes), tuple(impls))
              for g, n, d in sweep_configs(args, on_cuda)]
    if wants_paper_point(args):
        paper_impls = tuple(i for i in impls if i in PAPER_IMPLEMENTATIONS)
        if paper_impls:  # last: a run cut short keeps the regular sweep's rows
            points.append(Point(*PAPER_POINT, modes=("forward+backward",), implementations=paper_impls,
                                note=PAPER_NOTE, max_repeats=5 if on_cuda else 3))
    return points


def triton_unavailable_reason(on_cuda: bool) -> str | None:
    if not on_cuda:
        return "no CUDA device (the Triton kernels need a GPU; CPU interpretation is for tests only)"
    from d2sm_loss.functional import _triton_error

    return _triton_error()


def triton_executed_n2d(mode: str, d: int) -> float | None:
    """FLOPs the Triton kernels execute per group at float32, in units of N^2 D: forward
    ``4``, backward ``4 ceil(D / block_dout) + 2`` with the GPU block configuration."""
    try:
        from d2sm_loss.ops.triton_kernels import choose_block_config

        block_dout = choose_block_config(d, torch.float32, interpreted=False).block_dout
    except Exception:  # Triton not importable
        return None
    backward = 4 * math.ceil(d / block_dout) + 2
    return {"forward": 4, "backward": backward, "forward+backward": 4 + backward}[mode]


def measure_ceiling(meta: dict[str, Any], note: str) -> tuple[float | None, dict[str, Any]]:
    """The ``torch.matmul`` ceiling (TFLOP/s) under this run's float32 precision, and its row."""
    precision = "tf32" if tf32_allowed() else "fp32"
    row = {**meta, "implementation": f"matmul_{precision}", "mode": "forward", "G": 1, "N": 8192, "D": 8192,
           "dtype": "float32", "repeats": 10,
           "note": (f"torch.matmul ceiling, float32 inputs, {precision} products " + note).strip()}
    try:
        ceiling = common.cuda_matmul_tflops(8192)
    except Exception as error:
        traceback.print_exc()
        row["status"] = "OOM" if common.is_oom(error) else common.error_status(error)
        print(f"matmul ceiling: {row['status']}")
        return None, row
    row.update(status="ok", tflops_nominal=ceiling, tflops_executed=ceiling, pct_of_ceiling=100.0)
    print(f"matmul ceiling (8192^2 float32 inputs, {precision} products): {ceiling:.1f} TFLOP/s")
    return ceiling, row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced CPU sweep (< 1 minute), for CI")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS, help="folder for the CSV and PNGs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--n", type=int, nargs="+", help="rows per group (overrides the sweep)")
    parser.add_argument("--d", type=int, nargs="+", help="features (overrides the sweep)")
    parser.add_argument("--g", type=int, nargs="+", help="groups (overrides the sweep)")
    parser.add_argument("--paper-point", choices=("auto", "yes", "no", "only"), default="auto",
                        help="the image-granularity point G=1, N=232, D=100352, forward+backward, reference/torch/"
                             "triton: auto = in the full default sweep only; yes = add it; only = nothing else")
    parser.add_argument("--kernel", choices=("cosine", "softmax"), default="cosine")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--exclude-self", action="store_true", help="include_self=False")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per point (default 3 quick, 7 CPU, 20 CUDA; D=100352: at most 5 / 3)")
    parser.add_argument("--cpu-memory-limit-gb", type=float, default=None,
                        help="allocation limit per CPU point (default 75%% of available memory)")
    common.add_run_arguments(parser)
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for float32 matrix products in every implementation "
                             "(torch.set_float32_matmul_precision('high')); the default compares exact float32")
    args = parser.parse_args(argv)
    common.apply_commit_argument(args.commit)

    if args.plot_only:
        for path in draw_plots(args.out / CSV_NAME, args.out):
            print(f"plot: {path}")
        return 0
    device = common.pick_device(args.device, args.quick, parser)
    on_cuda = device.type == "cuda"
    repeats = args.repeats or (3 if args.quick else 20 if on_cuda else 7)
    dtype = torch.float32
    include_self = not args.exclude_self

    impls = list(args.implementations)
    if "triton" in impls:
        reason = triton_unavailable_reason(on_cuda)
        if reason is not None:
            print(f"note: skipping implementation 'triton': {reason}")
            impls.remove("triton")

    memory_limit = None
    if not on_cuda:
        if args.cpu_memory_limit_gb:
            memory_limit = int(args.cpu_memory_limit_gb * 2**30)
        else:
            available = common.available_memory_bytes()
            memory_limit = int(0.75 * available) if available else None

    if args.tf32:
        torch.set_float32_matmul_precision("high")
        args.note = ("tf32 " + args.note).strip()
    meta = common.metadata(device)
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {meta['commit']} | threads {meta['threads']} | repeats {repeats}", flush=True)
    csv_path = args.out / CSV_NAME
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        """Keep the row for the summaries and append it to the CSV at once."""
        rows.append(row)
        common.append_rows(csv_path, [row], FIELDS)

    ceiling = None
    if on_cuda:
        ceiling, ceiling_row = measure_ceiling(meta, args.note)
        record(ceiling_row)

    gave_oom: set[tuple] = set()
    header = f"{'impl':>9} {'mode':>16} {'G':>2} {'N':>6} {'D':>6} {'median ms':>10} {'IQR ms':>8} {'peak MiB':>9}"
    header += f" {'TFLOP/s nominal':>15}" if on_cuda else ""
    print(header, flush=True)
    for point in sweep_points(args, on_cuda, impls):
        g, n, d = point.g, point.n, point.d
        point_repeats = min(repeats, point.max_repeats) if point.max_repeats else repeats
        for impl, mode in product(point.implementations, point.modes):
            key = (impl, mode, g, d)
            row = {**meta, "implementation": impl, "mode": mode, "G": g, "N": n, "D": d, "kernel": args.kernel,
                   "temperature": args.temperature if args.kernel == "softmax" else "",
                   "include_self": include_self, "dtype": "float32", "repeats": point_repeats,
                   "note": "; ".join(filter(None, [point.note, args.note]))}
            if key in gave_oom:
                print(f"{impl:>9} {mode:>16} {g:>2} {n:>6} {d:>6} skipped (OOM at smaller N)", flush=True)
                continue
            measured = (impl, mode, g, n, d, args.kernel, args.temperature, include_self, dtype, point_repeats)
            try:
                if on_cuda:
                    result = measure_point_cuda(*measured)
                else:
                    result = common.run_in_child(functools.partial(measure_point_cpu, *measured),
                                                 memory_limit_bytes=memory_limit)
            except Exception as error:  # outside the per-point guards (e.g. fork failed): record, go on
                traceback.print_exc()
                result = {"status": "OOM" if common.is_oom(error) else common.error_status(error)}
            row.update(result)
            if row["status"].startswith("error"):
                row["status"] = row["status"].splitlines()[0] if row["status"] else "error"
            if row["status"].startswith("OOM"):
                gave_oom.add(key)
            if row["status"] == "ok":
                seconds = row["time_median_ms"] * 1e-3
                row["tflops_nominal"] = FLOPS_PER_GROUP[mode] * g * n * n * d / seconds / 1e12
                if ceiling:
                    row["pct_of_ceiling"] = 100.0 * row["tflops_nominal"] / ceiling
                if impl == "triton":
                    executed = triton_executed_n2d(mode, d)
                    if executed is not None:
                        row["flops_executed_n2d"] = executed
                        row["tflops_executed"] = executed * g * n * n * d / seconds / 1e12
                line = (f"{impl:>9} {mode:>16} {g:>2} {n:>6} {d:>6} {row['time_median_ms']:>10.3f} "
                        f"{row['time_iqr_ms']:>8.3f} {row['peak_mem_mb']:>9.1f}")
                line += f" {row['tflops_nominal']:>15.2f}" if on_cuda else ""
            else:
                line = f"{impl:>9} {mode:>16} {g:>2} {n:>6} {d:>6} {row['status']}"
            print(line, flush=True)
            record(row)

    print(f"appended {len(rows)} rows to {csv_path}")
    print_fit_summary(rows)
    print("targets (issues 3 and 5):")
    for line in evaluate_targets(rows, on_cuda, tf32=args.tf32):
        print("  " + line)
    if not args.no_plots:
        for path in draw_plots(csv_path, args.out):
            print(f"plot: {path}")
    return 0


def print_fit_summary(rows: list[dict[str, Any]]) -> None:
    """Largest N that ran for each implementation, mode and (G, D) of this run; ``>= N``
    when nothing ran out of memory (N is then only the sweep's largest)."""
    fits: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row["implementation"].startswith("matmul_"):
            continue
        key = (row["implementation"], row["mode"], row["G"], row["D"])
        entry = fits.setdefault(key, {"ok": 0, "oom": None, "errors": []})
        if row["status"] == "ok":
            entry["ok"] = max(entry["ok"], row["N"])
        elif row["status"].startswith("OOM"):
            entry["oom"] = row["N"] if entry["oom"] is None else min(entry["oom"], row["N"])
        else:
            entry["errors"].append(row["N"])
    print("largest N that ran (first N out of memory):")
    for (impl, mode, g, d), entry in sorted(fits.items()):
        n_ok, n_oom = entry["ok"], entry["oom"]
        if n_oom is not None:
            text = f"N={n_ok or '-'} (OOM at N={n_oom})"
        elif n_ok:
            text = f"N>={n_ok} (no OOM in sweep)"
        else:
            text = "nothing ran"
        if entry["errors"]:
            text += f"; errors at N={','.join(map(str, entry['errors']))}"
        print(f"  {impl:>9} {mode:>16} G={g} D={d}: {text}")


# --- targets ---------------------------------------------------------------------------

#: Issue 3's memory bound at G = 8, N = 16384, read as 2 GB = 2e9 bytes (not 2 GiB).
TRITON_16K_MEMORY_BYTES = 2e9


def evaluate_targets(rows: list[dict[str, Any]], on_cuda: bool, tf32: bool = False) -> list[str]:
    """One PASS/FAIL line per target of issues 3 and 5 that this run's rows measured
    (``not measured in this run`` otherwise); the figures are ratios of medians and of
    peak memory above the inputs, forward + backward, float32."""

    def find(impl: str, g: int, n: int, d: int) -> dict[str, Any] | None:
        for row in rows:
            if (row["implementation"], row["mode"], row["G"], row["N"], row["D"]) == \
                    (impl, "forward+backward", g, n, d) and row["status"] == "ok":
                return row
        return None

    def status_of(impl: str, g: int, n: int, d: int) -> str:
        for row in rows:
            if (row["implementation"], row["mode"], row["G"], row["N"], row["D"]) == \
                    (impl, "forward+backward", g, n, d):
                return row["status"]
        return "not run"

    def missing(*points: tuple[str, int, int, int]) -> str:
        what = ", ".join(f"{impl} G={g} N={n} D={d}: {status_of(impl, g, n, d)}" for impl, g, n, d in points
                         if find(impl, g, n, d) is None)
        return f"not measured in this run ({what})"

    def mem_ratio(num: dict[str, Any], den: dict[str, Any]) -> float:
        return num["peak_mem_mb"] / den["peak_mem_mb"] if den["peak_mem_mb"] > 0 else math.inf

    precision = " [TF32 products]" if tf32 else ""
    kernel = next((r["kernel"] for r in rows if r.get("kernel")), "cosine")
    lines = []
    if on_cuda:
        ref, tri = find("reference", 8, 4096, 256), find("triton", 8, 4096, 256)
        label = (f"GPU: triton vs reference, G=8 N=4096 D=256 float32 forward+backward ({kernel}){precision}: "
                 f">= 4x faster, <= 1/20 of its peak memory")
        if ref and tri:
            speed, memory = ref["time_median_ms"] / tri["time_median_ms"], mem_ratio(tri, ref)
            verdict = "PASS" if speed >= 4 and memory <= 1 / 20 else "FAIL"
            lines.append(f"{label}: {speed:.2f}x faster, memory {memory:.4f} of the reference's "
                         f"(1/{1 / memory if memory > 0 else math.inf:.1f}) -> {verdict}")
        else:
            lines.append(f"{label}: {missing(('reference', 8, 4096, 256), ('triton', 8, 4096, 256))}")
        tri16 = find("triton", 8, 16384, 256)
        label = (f"GPU: triton G=8 N=16384 D=256 forward+backward{precision}: peak memory above the inputs "
                 f"<= 2 GB (2e9 bytes)")
        if tri16:
            peak = tri16["peak_mem_mb"] * 2**20
            lines.append(f"{label}: {peak / 1e9:.3f} GB -> {'PASS' if peak <= TRITON_16K_MEMORY_BYTES else 'FAIL'}")
        else:
            lines.append(f"{label}: {missing(('triton', 8, 16384, 256))}")
        base = find("baseline", 8, 4096, 256)
        label = (f"GPU: triton vs contextual baseline, G=8 N=4096 D=256 forward+backward{precision}: "
                 f">= 4x faster, >= 20x less memory")
        if base and tri:
            speed, memory = base["time_median_ms"] / tri["time_median_ms"], mem_ratio(base, tri)
            verdict = "PASS" if speed >= 4 and memory >= 20 else "FAIL"
            lines.append(f"{label}: {speed:.2f}x faster, {memory:.1f}x less memory -> {verdict}")
        else:
            lines.append(f"{label}: {missing(('baseline', 8, 4096, 256), ('triton', 8, 4096, 256))}")
        lines.append("CPU: streaming vs reference at G=1 N=4096 D=64: not measured in this run (a GPU run)")
    else:
        for target in ("triton vs reference (G=8, N=4096, D=256)", "triton at G=8, N=16384 within 2 GB",
                       "triton vs contextual baseline (G=8, N=4096, D=256)"):
            lines.append(f"GPU: {target}: not measured in this run (no CUDA device)")
        ref, stream = find("reference", 1, 4096, 64), find("torch", 1, 4096, 64)
        label = (f"CPU: streaming vs reference, G=1 N=4096 D=64 float32 forward+backward ({kernel}, "
                 f"{torch.get_num_threads()} thread(s)): memory <= 1/10, time <= 1.5x")
        if ref and stream:
            time_ratio, memory = stream["time_median_ms"] / ref["time_median_ms"], mem_ratio(stream, ref)
            verdict = "PASS" if time_ratio <= 1.5 and memory <= 1 / 10 else "FAIL"
            lines.append(f"{label}: time {time_ratio:.2f}x, memory {memory:.4f} of the reference's -> {verdict}")
        else:
            lines.append(f"{label}: {missing(('reference', 1, 4096, 64), ('torch', 1, 4096, 64))}")
    return lines


def draw_plots(csv_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per (device, CPU threads, G, D, kernel): time and peak memory against N, one line per
    implementation, one row of panels per mode; the newest measurement of each point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plots drawn (pip install matplotlib)")
        return []
    key = ("device", "threads", "implementation", "mode", "G", "N", "D", "kernel", "temperature", "include_self",
           "dtype")
    rows = [r for r in common.latest_rows(common.read_rows(csv_path), key)
            if not r["implementation"].startswith("matmul_")]
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["device"], row.get("threads", ""), row["G"], row["D"], row["kernel"],
                           row["include_self"]), []).append(row)
    written = []
    for (device, threads, g, d, kernel, include_self), group in sorted(groups.items()):
        modes = [m for m in MODES if any(r["mode"] == m for r in group)]
        if len({r["N"] for r in group}) < 1:
            continue
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.4 * len(modes)), squeeze=False)
        for i, mode in enumerate(modes):
            for impl in IMPLEMENTATIONS:
                pts = sorted((int(r["N"]), r) for r in group if r["mode"] == mode and r["implementation"] == impl)
                ok = [(n, r) for n, r in pts if r["status"] == "ok"]
                if not pts:
                    continue
                for j, column in enumerate(("time_median_ms", "peak_mem_mb")):
                    ax = axes[i][j]
                    if ok:
                        line, = ax.plot([n for n, _ in ok], [common.as_float(r[column]) for _, r in ok],
                                        marker="o", label=impl)
                        color = line.get_color()
                    else:
                        color = None
                    for n, r in pts:
                        if r["status"].startswith("OOM"):
                            ax.axvline(n, color=color or "gray", linestyle=":", alpha=0.7)
                            ax.annotate(f"{impl} OOM", (n, 0.95), xycoords=("data", "axes fraction"),
                                        rotation=90, fontsize=7, va="top")
            for j, label in enumerate(("time, median (ms)", "peak memory above inputs (MiB)")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (rows per group)")
                ax.set_ylabel(label)
                ax.set_title(f"{mode}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
        self_txt = "" if include_self in ("True", "true", "1") else ", include_self=False"
        where = f"{device}, {threads} thread(s)" if device.startswith("CPU") else device
        fig.suptitle(f"similarity_kl, {kernel} kernel, G={g}, D={d}, float32{self_txt}\n{where}", fontsize=10)
        fig.tight_layout()
        suffix = f"_t{threads}" if device.startswith("CPU") and threads else ""
        path = Path(out_dir) / f"statistics_kernel_{common.slug(device)}{suffix}_G{g}_D{d}_{kernel}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    sys.exit(main())

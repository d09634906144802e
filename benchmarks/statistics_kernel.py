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
- TFLOP/s: nominal, ``4 N^2 D`` FLOPs per group forward, ``12 N^2 D`` backward,
  ``16 N^2 D`` both (the Triton kernels' count; the streaming PyTorch backward does
  ``8 N^2 D``). Printed for the GPU rows, recorded for all. On CUDA a float32
  ``torch.matmul`` of two 8192^2 matrices gives the ceiling (row ``matmul_fp32``).

Every run appends its rows to ``<out>/statistics_kernel.csv`` (device, torch and triton
versions, commit, date, configuration, figures) and redraws the PNG plots (time and
memory against N, one line per implementation, newest figure per point) from the CSV.

Usage::

    python benchmarks/statistics_kernel.py --quick            # CPU smoke run, < 1 minute
    python benchmarks/statistics_kernel.py                    # full sweep on CUDA; moderate on CPU
    python benchmarks/statistics_kernel.py --n 4096 --d 64 --g 1 --modes forward+backward
    python benchmarks/statistics_kernel.py --plot-only         # redraw the PNGs from the CSV
"""

from __future__ import annotations

import argparse
import functools
import sys
from itertools import product
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402

from benchmarks import _common as common  # noqa: E402
from d2sm_loss.functional import similarity_kl  # noqa: E402

CSV_NAME = "statistics_kernel.csv"
IMPLEMENTATIONS = ("reference", "torch", "triton", "baseline")
MODES = ("forward", "backward", "forward+backward")
FIELDS = [
    "date", "commit", "device", "torch", "triton", "python", "threads",
    "implementation", "mode", "G", "N", "D", "kernel", "temperature", "include_self", "dtype",
    "repeats", "status", "time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms",
    "peak_mem_mb", "mem_method", "tflops", "note",
]
FLOPS_PER_GROUP = {"forward": 4, "backward": 12, "forward+backward": 16}  # times N^2 D


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
        if not common.is_oom(error):
            raise
        return {"status": "OOM"}
    finally:
        torch.cuda.empty_cache()
    return {"status": "ok", "peak_mem_mb": peak / 2**20, "mem_method": "cuda-max-allocated",
            **common.summarize(times)}


# --- sweeps -----------------------------------------------------------------------------


def sweep_configs(args, on_cuda: bool) -> list[tuple[int, int, int]]:
    """(G, N, D) points, sorted so that N grows within each (G, D)."""
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


def triton_unavailable_reason(on_cuda: bool) -> str | None:
    if not on_cuda:
        return "no CUDA device (the Triton kernels need a GPU; CPU interpretation is for tests only)"
    from d2sm_loss.functional import _triton_error

    return _triton_error()


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
    parser.add_argument("--kernel", choices=("cosine", "softmax"), default="cosine")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--exclude-self", action="store_true", help="include_self=False")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 3 quick, 7 CPU, 20 CUDA)")
    parser.add_argument("--cpu-memory-limit-gb", type=float, default=None,
                        help="allocation limit per CPU point (default 75%% of available memory)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plots from the CSV in --out")
    parser.add_argument("--note", default="", help="free text stored with every row of this run")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TF32 for float32 matrix products in every implementation "
                             "(torch.set_float32_matmul_precision('high')); the default compares exact float32")
    args = parser.parse_args(argv)

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
          f"commit {meta['commit']} | threads {meta['threads']} | repeats {repeats}")
    rows: list[dict[str, Any]] = []
    if on_cuda:
        ceiling = common.cuda_matmul_tflops(8192)
        print(f"float32 matmul ceiling (8192^2, float32 matmul precision {torch.get_float32_matmul_precision()!r}): "
              f"{ceiling:.1f} TFLOP/s")
        rows.append({**meta, "implementation": "matmul_fp32", "mode": "forward", "G": 1, "N": 8192, "D": 8192,
                     "dtype": "float32", "status": "ok", "tflops": ceiling, "repeats": 10,
                     "note": "torch.matmul ceiling " + args.note})

    gave_oom: set[tuple] = set()
    header = f"{'impl':>9} {'mode':>16} {'G':>2} {'N':>6} {'D':>4} {'median ms':>10} {'IQR ms':>8} {'peak MiB':>9}"
    header += f" {'TFLOP/s':>8}" if on_cuda else ""
    print(header)
    for (g, n, d), impl, mode in product(sweep_configs(args, on_cuda), impls, args.modes):
        key = (impl, mode, g, d)
        row = {**meta, "implementation": impl, "mode": mode, "G": g, "N": n, "D": d, "kernel": args.kernel,
               "temperature": args.temperature if args.kernel == "softmax" else "",
               "include_self": include_self, "dtype": "float32", "repeats": repeats, "note": args.note}
        if key in gave_oom:
            result = {"status": "skipped (OOM at smaller N)"}
        else:
            point = (impl, mode, g, n, d, args.kernel, args.temperature, include_self, dtype, repeats)
            if on_cuda:
                result = measure_point_cuda(*point)
            else:
                result = common.run_in_child(lambda: measure_point_cpu(*point), memory_limit_bytes=memory_limit)
        row.update(result)
        if row["status"].startswith("OOM"):
            gave_oom.add(key)
        if row["status"] == "ok":
            flops = FLOPS_PER_GROUP[mode] * g * n * n * d
            row["tflops"] = flops / (row["time_median_ms"] * 1e-3) / 1e12
            line = (f"{impl:>9} {mode:>16} {g:>2} {n:>6} {d:>4} {row['time_median_ms']:>10.3f} "
                    f"{row['time_iqr_ms']:>8.3f} {row['peak_mem_mb']:>9.1f}")
            line += f" {row['tflops']:>8.2f}" if on_cuda else ""
        else:
            line = f"{impl:>9} {mode:>16} {g:>2} {n:>6} {d:>4} {row['status']}"
        print(line, flush=True)
        if not row["status"].startswith("skipped"):
            rows.append(row)

    csv_path = args.out / CSV_NAME
    common.append_rows(csv_path, rows, FIELDS)
    print(f"appended {len(rows)} rows to {csv_path}")
    print_fit_summary(rows)
    if not args.no_plots:
        for path in draw_plots(csv_path, args.out):
            print(f"plot: {path}")
    return 0


def print_fit_summary(rows: list[dict[str, Any]]) -> None:
    """Largest N that ran for each implementation, mode and (G, D) of this run."""
    fits: dict[tuple, list] = {}
    for row in rows:
        if row["implementation"] == "matmul_fp32":
            continue
        key = (row["implementation"], row["mode"], row["G"], row["D"])
        entry = fits.setdefault(key, [0, None])
        if row["status"] == "ok":
            entry[0] = max(entry[0], row["N"])
        elif row["status"].startswith("OOM") and entry[1] is None:
            entry[1] = row["N"]
    print("largest N that fit (first N out of memory):")
    for (impl, mode, g, d), (n_ok, n_oom) in sorted(fits.items()):
        print(f"  {impl:>9} {mode:>16} G={g} D={d}: N={n_ok or '-'}" + (f" (OOM at N={n_oom})" if n_oom else ""))


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
    rows = [r for r in common.latest_rows(common.read_rows(csv_path), key) if r["implementation"] != "matmul_fp32"]
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

"""Helpers shared by the benchmarks in this folder.

- :func:`metadata`: what every CSV row records about the run (device, versions, commit, date;
  the commit from ``$D2SM_COMMIT`` / ``--commit`` when the copy has no ``.git``).
- :func:`append_rows` / :func:`read_rows` / :func:`latest_rows`: the results CSVs, which
  grow row by row (a killed run keeps what it measured) and are never rewritten except
  to add a column; :func:`merge_csv` (``python benchmarks/_common.py merge TARGET SOURCE...``)
  appends the rows of CSVs returned from another machine.
- :func:`error_status`: ``"error: <Type>: <first line>"`` for a failed point.
- :func:`time_cpu` / :func:`time_cuda`: per-repeat wall times with fresh inputs each repeat.
- :class:`RssPeak` and :func:`run_in_child`: honest peak-memory figures on the CPU (a
  forked child per point, the kernel's resident-set high-water mark reset right before
  the measured call).
- :func:`cuda_peak_bytes`: the same on CUDA from the caching allocator's statistics.
- :func:`is_oom`: whether an exception means "out of memory" on either device.

Timing protocol. ``prepare()`` builds fresh inputs (``torch.randn``) for each repeat
outside the timed region; ``run(state)`` is timed. CPU: ``time.perf_counter`` around
one call per repeat (see :func:`time_cpu`). CUDA: CUDA events around
``run`` after ``torch.cuda.synchronize()``, after ``warmup`` untimed calls.
"""

from __future__ import annotations

import argparse

import csv
import datetime as _dt
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


# --- run metadata -------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def pick_device(requested: str, quick: bool, parser: argparse.ArgumentParser) -> torch.device:
    """``--device auto|cpu|cuda``: auto is CUDA when available, except for ``--quick``
    (a CPU smoke run)."""
    if quick and requested == "auto":
        requested = "cpu"
    on_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return torch.device("cuda" if on_cuda else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({os.cpu_count()} logical cores)"


#: Environment variable that overrides :func:`git_commit` (a copy of the repository
#: without ``.git``, e.g. on a GPU machine: ``D2SM_COMMIT=$(git rev-parse --short HEAD)``
#: where the copy was made). The scripts' ``--commit`` option sets it.
COMMIT_ENV = "D2SM_COMMIT"


def git_commit() -> str:
    """The commit the rows belong to: ``$D2SM_COMMIT`` when set, else ``git rev-parse
    --short HEAD`` with ``+dirty`` when tracked files differ from it, else ``unknown``."""
    override = os.environ.get(COMMIT_ENV, "").strip()
    if override:
        return override
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # not installed, or broken
        return "none"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both benchmark scripts share: plotting, a note and the commit for the rows."""
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plots from the CSV in --out")
    parser.add_argument("--note", default="", help="free text stored with every row of this run")
    parser.add_argument("--commit", default=None,
                        help=f"commit recorded in every row (default: ${COMMIT_ENV}, else git rev-parse in this "
                             "checkout, else 'unknown'); for a copy without .git")


def apply_commit_argument(commit: str | None) -> None:
    if commit:
        os.environ[COMMIT_ENV] = commit


def error_status(error: BaseException) -> str:
    """``"error: <Type>: <first line of the message>"`` (a CSV status)."""
    text = str(error).strip().splitlines()
    return f"error: {type(error).__name__}: {text[0] if text else ''}".rstrip(": ").rstrip()


def metadata(device: torch.device) -> dict[str, Any]:
    """Columns every row of a run shares."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


# --- CSV ---------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: Sequence[dict[str, Any]], fieldnames: Sequence[str]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new or empty).

    If the file exists, rows are written in its own column order. Only when
    ``fieldnames`` holds columns the file lacks is it rewritten once, atomically (a
    temporary file renamed over it), with the union of the columns (old rows keep their
    values, new columns are empty for them); later appends then find every column and
    just append. Cheap enough to call once per row, so a killed run keeps what it measured.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_fields: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            old_fields = next(csv.reader(f), [])
    fields = old_fields or list(fieldnames)
    missing = [name for name in fieldnames if name not in old_fields]
    if old_fields and missing:
        old_rows = read_rows(path)
        fields = old_fields + missing
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(old_rows)
        os.replace(tmp, path)
    new_file = not old_fields
    with open(path, "w" if new_file else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()


def merge_csv(source: Path, target: Path) -> int:
    """Append every row of the CSV ``source`` (e.g. one returned from a GPU machine) to
    ``target`` with :func:`append_rows` (columns united); the number of rows moved."""
    rows = read_rows(source)
    if rows:
        append_rows(target, rows, list(rows[0]))
    return len(rows)


def latest_rows(rows: Iterable[dict[str, str]], key: Sequence[str]) -> list[dict[str, str]]:
    """The last row (file order, i.e. the newest run) for each value of the ``key`` columns."""
    latest: dict[tuple, dict[str, str]] = {}
    for row in rows:
        latest[tuple(row.get(k, "") for k in key)] = row
    return list(latest.values())


def as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --- timing -------------------------------------------------------------------------


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median, interquartile range, min and max of per-repeat times, in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ms[-1] - ms[0]
    return {
        "time_median_ms": statistics.median(ms),
        "time_iqr_ms": iqr,
        "time_min_ms": ms[0],
        "time_max_ms": ms[-1],
    }


def time_cpu(prepare: Callable[[], Any], run: Callable[[Any], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``run(prepare())``, fresh ``prepare()`` outside each timing.

    Uses ``time.perf_counter`` (the clock ``torch.utils.benchmark`` uses on the CPU)
    around exactly one call per repeat. ``torch.utils.benchmark.Timer.timeit`` is not
    used because it runs the statement twice more as a warm-up on the same setup,
    which a backward cannot do and which would reuse inputs.
    """
    import gc
    import time

    for _ in range(warmup):
        run(prepare())
    times = []
    for _ in range(repeats):
        state = prepare()
        gc.collect()
        start = time.perf_counter()
        run(state)
        times.append(time.perf_counter() - start)
        del state
    return times


def time_cuda(prepare: Callable[[], Any], run: Callable[[Any], Any], repeats: int, warmup: int = 3) -> list[float]:
    """Seconds per call of ``run(prepare())`` measured with CUDA events."""
    for _ in range(warmup):
        run(prepare())
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        state = prepare()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(state)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
        del state
    return times


def cuda_matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """Float32 ``torch.matmul`` throughput of two ``size`` x ``size`` matrices (TFLOP/s),
    with the process's current TF32 setting (PyTorch's default: TF32 off for matmul)."""
    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda")
    times = time_cuda(lambda: None, lambda _: torch.matmul(a, b), repeats=repeats, warmup=3)
    return 2.0 * size**3 / statistics.median(times) / 1e12


# --- memory -------------------------------------------------------------------------


def is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    text = str(error).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory"))


def cuda_peak_bytes(run: Callable[[], Any]) -> int:
    """Peak CUDA memory allocated during ``run()`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_heap() -> None:
    """Return malloc's free memory to the OS (glibc ``malloc_trim(0)``), so that a later
    allocation that reuses it shows up as new resident memory. No-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Peak resident memory of this process during a ``with`` block, above its start.

    Preferred method (Linux >= 4.0): write ``5`` to ``/proc/self/clear_refs``, which
    resets the kernel's resident-set high-water mark (VmHWM, also what
    ``getrusage(RUSAGE_SELF).ru_maxrss`` reports) to the current resident set; the
    figure is VmHWM at the end minus VmRSS at the start. This counts every page the
    block touched beyond what was resident before, whoever allocated it (PyTorch, BLAS
    workspaces, malloc arenas). Before the reset, malloc's free memory is handed back to
    the OS (:func:`release_free_heap`), and the block should run in a fresh process
    (:func:`run_in_child`), so that memory freed by earlier work cannot hide new
    allocations.

    Fallback (``clear_refs`` not writable): ``ru_maxrss`` after minus ``ru_maxrss``
    before, a lower bound (it misses usage below the earlier high-water mark).
    """

    def __enter__(self):
        self.method = "vmhwm-reset"
        release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base_kib = _proc_status_kib("VmRSS")
            if self.base_kib is None:
                raise OSError("no VmRSS")
        except OSError:
            self.method = "ru_maxrss-delta"
            self.base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.method == "vmhwm-reset":
            peak = _proc_status_kib("VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_bytes = max(0, peak - self.base_kib) * 1024
        return False


def limit_memory(limit_bytes: int | None) -> None:
    """Make allocations beyond ``limit_bytes`` more fail with an error (``RLIMIT_DATA``,
    counted from the current data segment) instead of invoking the OOM killer."""
    if not limit_bytes:
        return
    data_kib = _proc_status_kib("VmData") or 0
    soft = data_kib * 1024 + int(limit_bytes)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    except (ValueError, OSError):
        pass


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_in_child(fn: Callable[[], dict[str, Any]], memory_limit_bytes: int | None = None) -> dict[str, Any]:
    """Run ``fn()`` in a forked child and return its result dict.

    The parent must not have run any parallel PyTorch work (fork after OpenMP is
    unsafe); it may have imported torch. Errors in the child come back as
    ``{"status": "OOM"}`` or ``{"status": "error: ..."}``; a child killed by a signal
    (the kernel's OOM killer sends SIGKILL) as ``{"status": "OOM (killed by signal 9)"}``.
    """
    import pickle

    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            limit_memory(memory_limit_bytes)
            try:
                result = fn()
            except Exception as error:  # reported to the parent
                result = {"status": "OOM" if is_oom(error) else error_status(error)}
                if not is_oom(error):
                    traceback.print_exc()
            payload = pickle.dumps(result)
            with os.fdopen(write_fd, "wb") as f:
                f.write(payload)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {"status": f"OOM (killed by signal {sig})" if sig == 9 else f"error: killed by signal {sig}"}
    if not payload:
        return {"status": f"error: child exited with code {os.WEXITSTATUS(status)}"}
    return pickle.loads(payload)


if __name__ == "__main__":
    # python benchmarks/_common.py merge TARGET.csv SOURCE.csv [SOURCE.csv ...]
    if len(sys.argv) < 4 or sys.argv[1] != "merge":
        sys.exit("usage: python benchmarks/_common.py merge TARGET.csv SOURCE.csv [SOURCE.csv ...]")
    for source in sys.argv[3:]:
        print(f"{source}: {merge_csv(Path(source), Path(sys.argv[2]))} rows appended to {sys.argv[2]}")

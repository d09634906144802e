"""One timer and one memory probe for every benchmark, and the errors they turn into rows.

A measured thing is a :class:`Case`: ``prepare()`` builds fresh inputs (outside the timed
region), ``run(state)`` is the measured work.

Time (:func:`measure_rounds`). Each case first runs ``warmup`` untimed calls (lazy
initialisation, cuDNN autotuning, Triton and ``torch.compile`` compilation; the first
call's wall time is kept as ``first_call_s``), then ``repeats`` rounds, each running every
live case once in an order rotated by the round number, so that drifts of the machine's
speed spread over all of them; ``paired_ratio`` compares two cases round by round. One
call is timed by :func:`time_call`: CUDA events after ``torch.cuda.synchronize()`` on GPU,
``time.perf_counter`` after ``gc.collect()`` on the CPU (``torch.utils.benchmark.Timer``
re-runs a statement on the same inputs, which a backward cannot do).

Memory (:func:`peak_memory`), the peak above what was allocated before the call. CUDA: the
caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU:
:class:`RssPeak`, the kernel's resident-set high-water mark reset right before the call
(free heap first returned to the OS); :func:`run_in_child` runs a whole point in a forked
child so that memory freed by earlier points cannot hide new allocations.

Errors (:func:`guarded`). Out of memory marks a case ``OOM``; any other error marks it
``error: <Type>: <first line>`` with the traceback on stderr; the case leaves the rotation
and the run goes on.
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from benchmarks.results import error_status


@dataclass
class Case:
    """One measured thing: ``run(prepare())``, and what measuring it gave."""

    name: str
    prepare: Callable[[], Any]
    run: Callable[[Any], Any]
    info: dict[str, Any] = field(default_factory=dict)  # extra row columns (shapes, variant, ...)
    times: list[float] = field(default_factory=list)
    peak_bytes: float = math.nan
    mem_method: str = ""
    first_call_s: float = math.nan
    status: str = "ok"
    after_call: Callable[[], None] | None = None  # e.g. read which implementation ran

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` means "out of memory" on either device."""
    if isinstance(error, MemoryError) or isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(error).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory"))


def guarded(case: Case, fn: Callable[[], Any]) -> None:
    """Run ``fn()``; an error marks ``case`` (``OOM`` or ``error: ...``) and clears its times."""
    if not case.ok:
        return
    try:
        fn()
        if case.after_call is not None:
            case.after_call()
    except Exception as error:
        if is_oom(error):
            case.status = "OOM"
        else:
            print(f"error in case {case.name}:", file=sys.stderr)
            traceback.print_exc()
            case.status = error_status(error)
        case.times.clear()
        if torch.cuda.is_available():
            try:
                torch.cuda.empty_cache()
            except Exception:  # a broken CUDA context: later cases report their own errors
                pass


def time_call(case: Case, device: torch.device) -> float:
    """Seconds of one ``case.run`` on fresh inputs."""
    state = case.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        case.run(state)
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3
    gc.collect()
    begin = time.perf_counter()
    case.run(state)
    return time.perf_counter() - begin


def warm_up(cases: Sequence[Case], warmup: int, device: torch.device) -> None:
    """``warmup`` untimed calls per case (at least one); the first call's time is kept."""
    for case in cases:
        def first() -> None:
            case.first_call_s = time_call(case, device)

        guarded(case, first)
        for _ in range(warmup - 1):
            guarded(case, lambda: case.run(case.prepare()))


def measure_rounds(cases: Sequence[Case], repeats: int, device: torch.device) -> None:
    """``repeats`` rounds; each runs every live case once, the order rotated by the round."""
    for r in range(repeats):
        live = [case for case in cases if case.ok]
        shift = r % max(1, len(live))
        for case in live[shift:] + live[:shift]:
            guarded(case, lambda: case.times.append(time_call(case, device)))


def measure(cases: Sequence[Case], repeats: int, warmup: int, device: torch.device) -> None:
    """Warm-up, one memory-probed call per case, then the interleaved timed rounds."""
    warm_up(cases, warmup, device)
    for case in cases:
        guarded(case, lambda: peak_memory(case, device))
    measure_rounds(cases, repeats, device)


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median, interquartile range, min and max of per-call times, in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ms[-1] - ms[0]
    return {"time_median_ms": statistics.median(ms), "time_iqr_ms": iqr, "time_min_ms": ms[0], "time_max_ms": ms[-1]}


def paired_ratio(case: Case, reference: Case | None) -> float | str:
    """Median over rounds of ``case``'s time / ``reference``'s in the same round (they ran
    back to back); ``""`` when either did not run every round."""
    if reference is None or not reference.times or len(reference.times) != len(case.times):
        return ""
    return statistics.median(t / u for t, u in zip(case.times, reference.times))


# --- memory -------------------------------------------------------------------------


def peak_memory(case: Case, device: torch.device) -> None:
    """One call of ``case`` on fresh inputs; sets ``peak_bytes`` and ``mem_method``."""
    state = case.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.run(state)
        torch.cuda.synchronize()
        case.peak_bytes = torch.cuda.max_memory_allocated() - base
        case.mem_method = "cuda-max-allocated above pre-call"
        del state
        torch.cuda.empty_cache()
        return
    gc.collect()
    with RssPeak() as peak:
        case.run(state)
    case.peak_bytes, case.mem_method = peak.peak_bytes, peak.method


def _proc_status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_heap() -> None:
    """Return malloc's free memory to the OS (glibc ``malloc_trim(0)``), so that reusing it
    shows up as new resident memory. No-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Peak resident memory of this process during a ``with`` block, above its start.

    Linux >= 4.0: after :func:`release_free_heap`, writing ``5`` to ``/proc/self/clear_refs``
    resets the resident-set high-water mark (VmHWM) to the current resident set; the figure
    is VmHWM at the end minus VmRSS at the start: every page the block touched beyond what
    was resident, whoever allocated it (PyTorch, BLAS workspaces, malloc arenas). Elsewhere
    ``ru_maxrss`` after minus before, a lower bound (method ``ru_maxrss-delta``).
    """

    def __enter__(self) -> "RssPeak":
        self.method = "vmhwm-reset"
        release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _proc_status_kib("VmRSS")
            if base is None:
                raise OSError("no VmRSS")
            self.base_kib = base
        except OSError:
            self.method = "ru_maxrss-delta"
            self.base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: object) -> bool:
        if self.method == "vmhwm-reset":
            peak = _proc_status_kib("VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_bytes = max(0, peak - self.base_kib) * 1024
        return False


def limit_memory(limit_bytes: int | None) -> None:
    """Make allocations beyond ``limit_bytes`` more fail with an error (``RLIMIT_DATA``,
    counted from the current data segment) instead of waking the OOM killer."""
    if not limit_bytes:
        return
    soft = (_proc_status_kib("VmData") or 0) * 1024 + int(limit_bytes)
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
    """``fn()`` in a forked child; its result dict, or ``{"status": "OOM" | "error: ..."}``.

    The parent must not have run parallel PyTorch work (fork after OpenMP is unsafe). A
    child killed by a signal (the OOM killer sends SIGKILL) reads ``OOM (killed by signal 9)``.
    """
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
            with os.fdopen(write_fd, "wb") as f:
                f.write(pickle.dumps(result))
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


def cuda_matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """Float32 ``torch.matmul`` throughput of two ``size`` x ``size`` matrices (TFLOP/s)
    under the process's TF32 setting."""
    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda")
    case = Case("matmul", lambda: None, lambda _: torch.matmul(a, b))
    warm_up([case], 3, torch.device("cuda"))
    measure_rounds([case], repeats, torch.device("cuda"))
    if not case.ok:
        raise (MemoryError if case.status == "OOM" else RuntimeError)(case.status)
    return 2.0 * size**3 / statistics.median(case.times) / 1e12

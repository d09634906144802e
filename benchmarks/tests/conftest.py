"""The benchmarks' tests import ``benchmarks`` and ``experiments`` from the checkout and run the
benchmarks as ``python -m benchmarks.x`` from its root, as a user does.

The checkout's root goes at the END of ``sys.path``, so that an installed ``d2sm_loss`` still
comes before the checkout's. ``python -m`` puts its working directory first instead, so under
``D2SM_TEST_INSTALLED=1`` (the suite testing an installed wheel) the children run from a copy of
the checkout made of links, without ``d2sm_loss/``: they import the installed wheel too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))


@pytest.fixture(scope="session")
def checkout(tmp_path_factory) -> Path:
    """Where the benchmarks run: the checkout, or a linked copy without ``d2sm_loss/``."""
    if os.environ.get("D2SM_TEST_INSTALLED") != "1":
        return REPO
    mirror = tmp_path_factory.mktemp("checkout")
    for entry in REPO.iterdir():
        if entry.name not in ("d2sm_loss", ".venv"):
            (mirror / entry.name).symlink_to(entry)
    return mirror


@pytest.fixture
def run(checkout) -> Callable[..., subprocess.CompletedProcess]:
    """``run(*args, env=None, timeout=300)``: ``python *args`` from :func:`checkout` with one
    thread, asserting that it exits 0 (its output tails in the message)."""

    def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.run([sys.executable, *args], cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    return _run

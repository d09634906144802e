"""Smoke test of the statistics-kernel benchmark: ``--quick`` runs on the CPU, writes
CSV rows with finite figures and draws its plots into ``--out``."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_statistics_kernel_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "statistics_kernel.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "statistics_kernel.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows
    implementations = {row["implementation"] for row in rows}
    assert {"reference", "torch", "baseline"} <= implementations
    assert {row["mode"] for row in rows} == {"forward", "backward", "forward+backward"}
    for row in rows:
        assert row["status"] == "ok", row
        for column in ("time_median_ms", "time_iqr_ms", "peak_mem_mb", "tflops"):
            value = float(row[column])
            assert math.isfinite(value) and value >= 0, (column, row)
        assert float(row["time_median_ms"]) > 0
        assert row["device"] and row["torch"] and row["commit"] and row["date"]
    assert list(tmp_path.glob("statistics_kernel_*.png"))

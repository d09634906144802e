"""Smoke test of the queue benchmark: ``--quick`` runs on the CPU and writes keyed rows
for every queue size, the incremental and the full statistic, with ratios to the smallest
queue and the queue's memory."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys


def test_queue_cost_quick(tmp_path, checkout):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.queue_cost", "--quick", "--out", str(tmp_path)],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "queue_cost.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(row["part"], row["variant"], int(row["queue_size"])): row for row in rows}
    assert set(got) == {(part, variant, size) for size in (8, 32)
                        for part, variant in (("step", "eager"), ("statistics", "incremental"), ("statistics", "full"))}
    for (part, variant, size), row in got.items():
        assert row["status"] == "ok" and float(row["time_median_ms"]) > 0
        assert math.isfinite(float(row["paired_ratio_vs_ref"]))
        assert int(row["N"]) == 2 + size and int(row["D"]) == 512 * 2 * 2  # conv5_4 of 32x32 images
        block = math.isqrt(size)  # two size x size matrices, columns padded to whole blocks; block sums
        blocks = -(-size // block)
        assert float(row["cache_mb"]) == (2 * size * blocks * block + 3 * size * blocks + 5 * size) * 4 / 2**20
        assert float(row["queue_rows_mb"]) == 2 * size * 2048 * 4 / 2**20
    assert got[("step", "eager", 8)]["paired_ratio_vs_ref"] == "1.0"

"""Smoke test of the training-step overhead benchmark: ``--quick`` runs on the CPU,
appends CSV rows with finite figures and draws its plot into ``--out``."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_loss_overhead_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "loss_overhead.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "loss_overhead.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows

    ok = [row for row in rows if row["status"] == "ok"]
    steps = {row["config"]: row for row in ok if row["part"] == "step"}
    assert {"l1", "vgg", "paper", "loc-torch", "contextual"} <= set(steps)
    for row in ok:
        for column in ("time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms", "peak_mem_mb"):
            value = float(row[column])
            assert math.isfinite(value) and value >= 0, (column, row)
        assert float(row["time_median_ms"]) > 0
        assert row["device"] and row["torch"] and row["timm"] and row["commit"] and row["date"]
    for config, row in steps.items():
        for column in ("ratio_time_vs_a", "ratio_time_vs_b", "ratio_mem_vs_a", "ratio_mem_vs_b"):
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (config, column)
    assert float(steps["l1"]["ratio_time_vs_a"]) == 1.0

    # The loss alone, split: backbone passes and statistics, with their shares.
    for config in ("vgg", "paper", "loc-torch", "contextual"):
        parts = {row["part"]: row for row in ok if row["config"] == config and row["part"] != "step"}
        assert {"loss", "backbone", "statistics"} <= set(parts), config
        assert math.isfinite(float(parts["statistics"]["share_pct"])), config
    paper_stats = next(r for r in ok if r["config"] == "paper" and r["part"] == "statistics")
    assert int(paper_stats["N"]) == 2 + 224  # batch plus the full queue

    # Which similarity_kl path each D2SM configuration ran (criterion.last_implementation):
    # (c) under "auto" on the CPU and (d) forced are the streaming path; the others run none.
    for config in ("paper", "loc-torch"):
        for row in ok:
            if row["config"] == config and row["part"] in ("step", "loss", "statistics"):
                assert row["implementation"] == "torch", (config, row["part"], row["implementation"])
    for row in ok:
        if row["config"] in ("l1", "vgg", "contextual", "dense-kl"):
            assert row["implementation"] == "", row

    # Triton has no CPU driver: recorded as skipped, with the reason.
    triton = [row for row in rows if row["config"] == "loc-triton"]
    assert triton and all(row["status"] == "skipped" and "CUDA" in row["note"] for row in triton)

    assert "target 1" in proc.stdout and "target 2" in proc.stdout and "target 3" in proc.stdout
    assert list(tmp_path.glob("loss_overhead_*.png"))


def _loss_overhead():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import loss_overhead

    return loss_overhead


def test_targets_when_the_paper_loss_did_not_run():
    """The statistics part ran but the whole loss did not (e.g. out of memory): no share,
    target 1 says why instead of raising."""
    lo = _loss_overhead()
    where = {"batch": 8, "height": 256, "width": 256}
    rows = [
        {**where, "config": "paper", "part": "statistics", "status": "ok", "share_pct": "", "time_median_ms": 1.0},
        {**where, "config": "paper", "part": "loss", "status": "OOM", "share_pct": ""},
    ]
    lines = lo.evaluate_targets(rows, on_cuda=True)
    assert any(line.startswith("target 1") and "not measured" in line and "OOM" in line for line in lines), lines
    assert any(line.startswith("target 2") and "not measured" in line for line in lines), lines

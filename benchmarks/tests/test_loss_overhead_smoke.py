"""Smoke tests of the training-step benchmark: ``--quick`` runs on the CPU and writes
keyed, complete rows (the loss measured through its public seam: the paper preset's
statistic sees the batch plus its full queue), the judge reads them; a failing case
becomes an error row; the compile and autocast modes write their variants with ratios
to the reference variant."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from benchmarks import judge
from benchmarks import loss_overhead as lo


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "loss_overhead.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows
    assert len({tuple(row[k] for k in lo.KEY) for row in rows}) == len(rows)  # one row per configuration
    for row in rows:
        assert all(row[k] for k in lo.KEY), row
        assert row["commit"] and row["torch"] and row["timm"] and row["date"] and row["run_id"]
        if row["status"] == "ok":
            for column in ("time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms", "peak_mem_mb"):
                value = float(row[column])
                assert math.isfinite(value) and value >= 0, (column, row)
            assert float(row["time_median_ms"]) > 0
    return rows


def test_loss_overhead_quick(tmp_path, run):
    run("-m", "benchmarks.loss_overhead", "--quick", "--out", str(tmp_path))
    rows = _rows(tmp_path)
    ok = [row for row in rows if row["status"] == "ok"]
    steps = {row["config"]: row for row in ok if row["part"] == "step"}
    assert {"l1", "vgg", "paper", "loc-streaming", "contextual"} <= set(steps)
    for config, row in steps.items():
        for column in ("ratio_time_vs_a", "ratio_time_vs_b", "paired_ratio_vs_b", "ratio_mem_vs_a", "ratio_mem_vs_b"):
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (config, column)
    assert float(steps["l1"]["ratio_time_vs_a"]) == 1.0

    # The loss alone, split through its seam: loss, rows (part "backbone") and statistic.
    for config in ("vgg", "paper", "loc-streaming", "contextual"):
        parts = {row["part"]: row for row in ok if row["config"] == config and row["part"] != "step"}
        assert {"loss", "backbone", "statistics"} <= set(parts), config
        assert math.isfinite(float(parts["statistics"]["share_pct"])), config
    paper = {row["part"]: row for row in ok if row["config"] == "paper"}
    assert all(int(row["N"]) == 2 + 224 for row in paper.values())  # batch plus the full queue, as rows() gives
    assert int(paper["step"]["D"]) == 512 * 4 * 4  # conv5_4 of a 64x64 image
    location = next(r for r in ok if r["config"] == "loc-streaming" and r["part"] == "statistics")
    assert (location["G"], location["N"], location["D"]) == ("2", str(16 * 16), "256")
    assert next(r for r in ok if r["config"] == "dense-kl")["N"] == location["N"]

    # Which similarity_kl path each D2SM row ran (criterion.last_implementation).
    for row in ok:
        if row["config"] in ("paper", "loc-streaming") and row["part"] in ("step", "loss", "statistics"):
            want = "incremental" if row["config"] == "paper" else "streaming"  # the queue's path, or the location one
            assert row["implementation"] == want, (row["config"], row["part"], row["implementation"])
        if row["config"] in ("l1", "vgg", "contextual", "dense-kl"):
            assert row["implementation"] == "", row
    triton = [row for row in rows if row["config"] == "loc-triton"]
    assert triton and all(row["status"] == "skipped" and "CUDA" in row["note"] for row in triton)

    out = run("-m", "benchmarks.judge", "--results", str(tmp_path)).stdout
    assert "statistics <= 5% of the loss's time" in out and "paper step <= 1.05x perceptual step (b)" in out
    assert "triton vs contextual at N=4096: not measured" in out and "CPU: indicative only" in out
    run("-m", "benchmarks.plot", "--results", str(tmp_path))
    assert list(tmp_path.glob("loss_overhead_*_b2_64x64.png"))


def test_a_failing_case_is_an_error_row(tmp_path, monkeypatch):
    """The failing case is a row with the first line of its error, the others are
    measured; rows carry the commit given by --commit (a copy without .git)."""
    original = lo.lc.loss_case

    def fail(state):
        raise ValueError("injected failure\nsecond line")

    def loss_case(config, *args):
        case = original(config, *args)
        if config == "vgg":
            case.run = fail
        return case

    monkeypatch.setattr(lo.lc, "loss_case", loss_case)
    monkeypatch.setenv("D2SM_COMMIT", "")  # restored after the test: --commit sets it
    assert lo.main(["--device", "cpu", "--configs", "l1", "vgg", "--sizes", "2x32", "--depth", "3", "--width", "8",
                    "--repeats", "1", "--warmup", "1", "--commit", "feedbee", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    status = {(r["config"], r["part"]): r["status"] for r in rows}
    assert status == {("l1", "step"): "ok", ("vgg", "step"): "ok", ("vgg", "loss"): "error: ValueError: injected failure",
                      ("vgg", "backbone"): "ok", ("vgg", "statistics"): "ok"}
    assert {r["commit"] for r in rows} == {"feedbee"}


def test_compile_mode(tmp_path, run):
    """Eager and compiled steps side by side (dynamo's graph capture, without inductor's
    code generation, to stay quick): ratios to eager, graphs counted, none compiled during
    the timed calls once the queue is full."""
    run("-m", "benchmarks.loss_overhead", "--mode", "compile", "--compile-backend", "eager", "--device", "cpu",
         "--configs", "l1", "paper", "--sizes", "2x32", "--depth", "3", "--width", "8", "--repeats", "2",
         "--out", str(tmp_path))
    rows = {(r["config"], r["variant"]): r for r in _rows(tmp_path)}
    assert set(rows) == {(c, v) for c in ("l1", "paper") for v in ("eager", "compiled-eager")}
    for config in ("l1", "paper"):
        eager, compiled = rows[(config, "eager")], rows[(config, "compiled-eager")]
        assert eager["status"] == compiled["status"] == "ok" and eager["mode"] == "compile"
        assert float(eager["ratio_time_vs_ref"]) == 1.0 and compiled["ratio_vs"] == "eager"
        assert float(compiled["ratio_time_vs_ref"]) > 0 and float(compiled["paired_ratio_vs_ref"]) > 0
        assert int(compiled["graphs"]) >= 1 and compiled["recompiles"] == "0"
        assert eager["graphs"] == ""
    assert rows[("paper", "compiled-eager")]["implementation"] == "incremental"  # the queue's path
    assert "compiled-eager" in run("-m", "benchmarks.judge", "--results", str(tmp_path)).stdout


def test_autocast_mode(tmp_path, run):
    run("-m", "benchmarks.loss_overhead", "--mode", "autocast", "--device", "cpu", "--configs", "l1", "paper",
         "--sizes", "2x32", "--depth", "3", "--width", "8", "--repeats", "2", "--out", str(tmp_path))
    rows = {(r["config"], r["variant"]): r for r in _rows(tmp_path)}
    assert set(rows) == {("l1", "fp32"), ("l1", "bf16"), ("paper", "fp32"), ("paper", "bf16+backbone-fp32"),
                         ("paper", "bf16+backbone-bf16")}
    for (config, variant), row in rows.items():
        assert row["status"] == "ok" and row["ratio_vs"] == "fp32", row
        assert row["dtype"] == ("float32" if variant == "fp32" else "autocast bfloat16")
        assert float(row["ratio_time_vs_ref"]) > 0 and float(row["ratio_mem_vs_ref"]) > 0
    out = run("-m", "benchmarks.judge", "--results", str(tmp_path)).stdout
    assert "paper bf16+backbone-bf16" in out and "x fp32 (paired" in out
    run("-m", "benchmarks.plot", "--results", str(tmp_path))
    assert list(tmp_path.glob("loss_autocast_*_b2_32x32.png"))


def test_targets_when_the_paper_loss_did_not_run():
    """The statistics part ran but the whole loss did not (e.g. out of memory): no share,
    the line says why instead of raising."""
    rows = [{"config": "paper", "part": "statistics", "status": "ok", "share_pct": "", "time_median_ms": "1.0"},
            {"config": "paper", "part": "loss", "status": "OOM", "share_pct": ""}]
    lines = judge.loss_targets(rows, on_cuda=True)
    assert any("5%" in line and "not measured" in line and "OOM" in line for line in lines), lines
    assert any("1.05x" in line and "not measured" in line for line in lines), lines

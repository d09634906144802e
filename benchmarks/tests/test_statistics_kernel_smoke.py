"""Smoke tests of the benchmarks' shared helpers and of the statistics-kernel benchmark.

``--quick`` runs on the CPU and writes keyed, complete rows; the judge and plot tools read
them; an error at one point becomes a row and the sweep goes on; the CUDA branch (faked
measurements, no GPU needed) writes the ceiling and TFLOP/s columns that the judge turns
into PASS/FAIL lines; the timer interleaves cases and keeps going past a failing one; the
CSV keeps its rows when columns are added; the tracked results still read."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from benchmarks import judge, measure, results
from benchmarks import statistics_kernel as sk


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))



def test_statistics_kernel_quick_then_judge_and_plot(tmp_path, run):
    run("-m", "benchmarks.statistics_kernel", "--quick", "--out", str(tmp_path), env={"D2SM_COMMIT": "abc1234"})
    rows = _read(tmp_path / "statistics_kernel.csv")
    assert {row["implementation"] for row in rows} == {"reference", "streaming", "baseline"}
    assert {row["mode"] for row in rows} == set(sk.MODES)
    assert len({tuple(row[k] for k in sk.KEY) for row in rows}) == len(rows)  # one row per configuration
    for row in rows:
        assert row["status"] == "ok", row
        assert all(row[k] for k in sk.KEY), row
        for column in ("time_median_ms", "time_iqr_ms", "peak_mem_mb", "tflops_nominal"):
            value = float(row[column])
            assert math.isfinite(value) and value >= 0, (column, row)
        assert float(row["time_median_ms"]) > 0 and row["mem_method"] == "vmhwm-reset"
        assert row["commit"] == "abc1234" and row["torch"] and row["date"] and row["run_id"]
    out = run("-m", "benchmarks.judge", "--results", str(tmp_path)).stdout
    assert "streaming forward+backward: G=1 D=64: N>=1024 (no OOM in sweep)" in out
    assert "streaming vs reference" in out and "not measured" in out
    run("-m", "benchmarks.plot", "--results", str(tmp_path))
    assert list(tmp_path.glob("statistics_kernel_*_t1_G1_D64_cosine.png"))


_FAILING_DRIVER = """
import sys
from benchmarks import statistics_kernel as sk
original = sk.measure_point_cpu
def measure_point(impl, *args):
    if impl == "streaming":
        raise ValueError("injected failure\\nsecond line")
    return original(impl, *args)
sk.measure_point_cpu = measure_point
sys.exit(sk.main(sys.argv[1:]))
"""


def test_statistics_kernel_error_becomes_a_row(tmp_path, run):
    """A non-OOM error at a point is a row (first line of the message) and the sweep goes
    on; rows carry the commit given by --commit (a copy without .git)."""
    run("-c", _FAILING_DRIVER, "--device", "cpu", "--n", "128", "256", "--d", "32",
         "--modes", "forward", "--implementations", "reference", "streaming", "--repeats", "1",
         "--commit", "feedbee", "--out", str(tmp_path))
    rows = _read(tmp_path / "statistics_kernel.csv")
    status = {(r["implementation"], r["N"]): r["status"] for r in rows}
    assert status == {("reference", "128"): "ok", ("reference", "256"): "ok",
                      ("streaming", "128"): "error: ValueError: injected failure",
                      ("streaming", "256"): "error: ValueError: injected failure"}
    assert {r["commit"] for r in rows} == {"feedbee"}


def _fake_cuda_point(impl, mode, g, n, d, options, repeats):
    """Made-up figures (ms, MiB) that pass every GPU target; the baseline runs out of
    memory at N = 16384 and Triton fails at N = 2048."""
    if impl == "baseline" and n == 16384:
        return {"status": "OOM"}
    if impl == "triton" and n == 2048:
        return {"status": "error: RuntimeError: injected"}
    time_ms = {"reference": 40.0, "triton": 8.0, "baseline": 50.0, "streaming": 20.0}[impl] * (n / 4096) ** 2
    memory = {"reference": 4000.0, "triton": 100.0, "baseline": 5000.0, "streaming": 300.0}[impl] * (n / 4096)
    return {"status": "ok", "time_median_ms": time_ms, "time_iqr_ms": 0.1, "time_min_ms": time_ms,
            "time_max_ms": time_ms, "peak_mem_mb": memory, "mem_method": "fake"}


def test_statistics_kernel_cuda_branch_faked(tmp_path, monkeypatch, capsys):
    """The CUDA branch with faked measurements: the ceiling row named by its precision,
    nominal and executed TFLOP/s, then the judge's target lines and fit summary."""
    pytest.importorskip("triton")
    import torch

    meta = {"device": "Fake GPU", "commit": "c0ffee", "torch": "x", "triton": "y", "threads": 1, "run_id": "r1"}
    monkeypatch.setattr(sk.results, "start_run", lambda args, parser: (torch.device("cuda"), dict(meta)))
    monkeypatch.setattr(sk, "triton_unavailable_reason", lambda on_cuda: None)
    monkeypatch.setattr(sk, "measure_ceiling", lambda meta, note: (50.0, {
        **meta, "implementation": "matmul_fp32", "mode": "forward", "G": 1, "N": 8192, "D": 8192, "kernel": "matmul",
        "include_self": "-", "dtype": "float32", "matmul_precision": "fp32", "status": "ok", "tflops_nominal": 50.0}))
    monkeypatch.setattr(sk, "measure_point_cuda", _fake_cuda_point)
    assert sk.main(["--device", "cuda", "--g", "8", "--n", "2048", "4096", "16384", "--d", "256",
                    "--modes", "forward+backward", "--out", str(tmp_path)]) == 0
    rows = _read(tmp_path / "statistics_kernel.csv")
    assert rows[0]["implementation"] == "matmul_fp32"
    triton = next(r for r in rows if r["implementation"] == "triton" and r["N"] == "4096")
    nominal = 16 * 8 * 4096**2 * 256 / 8e-3 / 1e12
    assert float(triton["tflops_nominal"]) == pytest.approx(nominal)
    assert float(triton["pct_of_ceiling"]) == pytest.approx(100 * nominal / 50.0)
    executed = float(triton["flops_executed_n2d"])
    assert executed >= 10 and float(triton["tflops_executed"]) == pytest.approx(nominal * executed / 16)

    capsys.readouterr()
    assert judge.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    target_lines = [line for line in out.splitlines() if "->" in line]
    assert len(target_lines) == 5 and all(line.endswith("PASS") for line in target_lines), out
    # executed FLOP/s against the ceiling: 10 N^2 D per group (forward 4, backward 6 at D = 256) in 8 ms
    executed_tflops = 10 * 8 * 4096**2 * 256 / 8e-3 / 1e12
    assert f"{executed_tflops:.1f} of 50.0 TFLOP/s, {100 * executed_tflops / 50:.0f}%" in out
    assert "5.00x faster, memory 0.0250" in out  # reference 40 ms / triton 8 ms; 100 / 4000 MiB
    assert "6.25x faster, 50.0x less memory" in out  # the baseline
    assert "0.419 GB" in out  # 100 MiB * 4 at N = 16384, in units of 1e9 bytes
    assert "baseline forward+backward: G=8 D=256: N=4096 (OOM at N=16384)" in out
    assert "reference forward+backward: G=8 D=256: N>=16384 (no OOM in sweep)" in out
    assert "errors at N=2048" in out


def test_judge_statistics_not_measured_and_cpu():
    lines = judge.statistics_targets([], on_cuda=True)
    assert len(lines) == 5 and all("not measured" in line for line in lines)
    point = {"mode": "forward+backward", "G": "1", "N": "4096", "D": "64", "status": "ok"}
    rows = [{**point, "implementation": "reference", "time_median_ms": "100.0", "peak_mem_mb": "400.0"},
            {**point, "implementation": "streaming", "time_median_ms": "160.0", "peak_mem_mb": "16.0"}]
    (line,) = judge.statistics_targets(rows, on_cuda=False)
    assert "time 1.60x" in line and "memory 0.0400" in line and line.endswith("FAIL")


def test_tracked_results_still_judge_and_plot(tmp_path, run):
    """The committed CSVs (older columns included) still give their figures."""
    out = run("-m", "benchmarks.judge").stdout
    assert "time 0.20x, memory 0.0349 of the reference's -> PASS" in out  # 1 thread, commit 9380902
    assert "14.93%" in out and "1.110x (median of per-round ratios 1.086x)" in out
    run("-m", "benchmarks.plot", "--out", str(tmp_path))
    assert (tmp_path / "loss_overhead_cpu-amd-epyc-2-logical-cores_b4_96x96.png").exists()


def test_paper_point_in_default_sweep_only():
    import argparse

    def args(**kw):
        base = {"n": None, "d": None, "g": None, "quick": False, "paper_point": "auto", "modes": list(sk.MODES)}
        return argparse.Namespace(**{**base, **kw})

    impls = ["reference", "streaming", "triton", "baseline"]
    full = sk.sweep_points(args(), on_cuda=True, impls=impls)
    assert (full[-1].g, full[-1].n, full[-1].d) == (1, 232, 100352)
    assert full[-1].implementations == ("reference", "streaming", "triton") and full[-1].modes == ("forward+backward",)
    assert all(p.d != 100352 for p in sk.sweep_points(args(quick=True), on_cuda=False, impls=impls))
    assert all(p.d != 100352 for p in sk.sweep_points(args(n=[256]), on_cuda=False, impls=impls))
    only = sk.sweep_points(args(paper_point="only"), on_cuda=False, impls=impls)
    assert [(p.g, p.n, p.d) for p in only] == [(1, 232, 100352)]


def test_append_rows_adds_columns_once_and_merge(tmp_path, run):
    path = tmp_path / "t.csv"
    results.append_rows(path, [{"a": 1, "tflops": 2}], ["a", "tflops"])
    results.append_rows(path, [{"a": 3, "tflops_nominal": 4}], ["a", "tflops_nominal"])
    results.append_rows(path, [{"a": 5, "tflops_nominal": 6}], ["a", "tflops_nominal"])
    with open(path) as f:
        assert f.readline().strip() == "a,tflops,tflops_nominal"
    assert [(r["a"], r["tflops"], r["tflops_nominal"]) for r in _read(path)] == \
        [("1", "2", ""), ("3", "", "4"), ("5", "", "6")]
    assert not list(tmp_path.glob("*.tmp"))
    target = tmp_path / "target.csv"
    run("-m", "benchmarks.results", "merge", str(target), str(path), str(path))
    assert len(_read(target)) == 6


def test_results_csv_is_keyed(tmp_path):
    csv_file = results.ResultsCSV(tmp_path / "k.csv", ["run_id", "config", "value"], key=["config"])
    csv_file.write({"run_id": "1", "config": "x", "value": 1})
    csv_file.write({"run_id": "2", "config": "x", "value": 2})
    csv_file.write({"run_id": "2", "config": "y", "value": 3})
    assert [(r["config"], r["value"]) for r in csv_file.latest()] == [("x", "2"), ("y", "3")]
    assert [r["value"] for r in results.newest_run(csv_file.rows())] == ["2", "3"]
    with pytest.raises(ValueError, match="key column"):
        csv_file.write({"run_id": "3", "value": 4})
    with pytest.raises(ValueError, match="not among the fields"):
        results.ResultsCSV(tmp_path / "k.csv", ["a"], key=["b"])


def test_measure_interleaves_and_survives_an_error(run):
    import torch

    calls: list[str] = []

    def case(name: str, fail_at: int | None = None) -> measure.Case:
        count = {"n": 0}

        def run(state):
            count["n"] += 1
            calls.append(name)
            if fail_at is not None and count["n"] >= fail_at:
                raise RuntimeError(f"{name} broke\nmore")

        return measure.Case(name, lambda: None, run)

    cases = [case("a"), case("b"), case("c", fail_at=4)]
    measure.measure(cases, repeats=3, warmup=1, device=torch.device("cpu"))
    a, b, c = cases
    assert a.ok and b.ok and len(a.times) == len(b.times) == 3
    assert c.status == "error: RuntimeError: c broke" and c.times == []
    # warm-up and memory calls, then rounds in rotated order; c fails in round 2 and leaves
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "a", "b"]
    assert math.isfinite(a.first_call_s) and a.mem_method in ("vmhwm-reset", "ru_maxrss-delta")
    a.times, b.times = [1.0, 2.0, 4.0], [2.0, 2.0, 2.0]
    assert measure.paired_ratio(a, b) == 1.0 and measure.paired_ratio(a, c) == ""
    assert measure.summarize([0.001, 0.003, 0.002])["time_median_ms"] == pytest.approx(2.0)

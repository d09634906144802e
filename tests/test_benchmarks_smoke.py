"""Smoke tests of the statistics-kernel benchmark: ``--quick`` runs on the CPU, writes
CSV rows with finite figures and draws its plots into ``--out``; an error at one point
becomes a row and the sweep goes on; the CUDA branch (faked measurements, no GPU needed)
prints the PASS/FAIL target lines and the fit summary; the CSV keeps its rows when a run
adds columns."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _statistics_kernel():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import statistics_kernel

    return statistics_kernel


def test_statistics_kernel_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "statistics_kernel.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = _read(tmp_path / "statistics_kernel.csv")
    assert rows
    implementations = {row["implementation"] for row in rows}
    assert {"reference", "torch", "baseline"} <= implementations
    assert {row["mode"] for row in rows} == {"forward", "backward", "forward+backward"}
    for row in rows:
        assert row["status"] == "ok", row
        for column in ("time_median_ms", "time_iqr_ms", "peak_mem_mb", "tflops_nominal"):
            value = float(row[column])
            assert math.isfinite(value) and value >= 0, (column, row)
        assert float(row["time_median_ms"]) > 0
        assert row["device"] and row["torch"] and row["commit"] and row["date"]
    assert "(no OOM in sweep)" in proc.stdout
    assert "not measured in this run" in proc.stdout
    assert list(tmp_path.glob("statistics_kernel_*.png"))


_FAILING_DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from benchmarks import statistics_kernel as sk
original = sk.measure_point_cpu
def measure(impl, *args):
    if impl == "torch":
        raise ValueError("injected failure\\nsecond line")
    return original(impl, *args)
sk.measure_point_cpu = measure
sys.exit(sk.main(sys.argv[1:]))
"""


def test_statistics_kernel_error_becomes_a_row(tmp_path):
    """A non-OOM error at a point is recorded (first line of the message) and the sweep
    goes on; rows carry the commit given through $D2SM_COMMIT (a copy without .git)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "D2SM_COMMIT": "feedbee"}
    proc = subprocess.run(
        [sys.executable, "-c", _FAILING_DRIVER.format(repo=str(REPO)), "--device", "cpu", "--n", "128", "256",
         "--d", "32", "--modes", "forward", "--implementations", "reference", "torch", "--repeats", "1",
         "--no-plots", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = _read(tmp_path / "statistics_kernel.csv")
    by_impl = {}
    for row in rows:
        by_impl.setdefault(row["implementation"], []).append(row)
    assert [r["status"] for r in by_impl["reference"]] == ["ok", "ok"]
    assert [r["status"] for r in by_impl["torch"]] == ["error: ValueError: injected failure"] * 2
    assert {r["commit"] for r in rows} == {"feedbee"}


def _fake_cuda_point(impl, mode, g, n, d, *rest):
    """Made-up figures (ms, MiB) that pass every GPU target, and an OOM for the baseline
    at N = 16384."""
    if impl == "baseline" and n == 16384:
        return {"status": "OOM"}
    if impl == "triton" and n == 2048:
        return {"status": "error: RuntimeError: injected"}
    time_ms = {"reference": 40.0, "triton": 8.0, "baseline": 50.0, "torch": 20.0}[impl] * (n / 4096) ** 2
    memory = {"reference": 4000.0, "triton": 100.0, "baseline": 5000.0, "torch": 300.0}[impl] * (n / 4096)
    return {"status": "ok", "time_median_ms": time_ms, "time_iqr_ms": 0.1, "time_min_ms": time_ms,
            "time_max_ms": time_ms, "peak_mem_mb": memory, "mem_method": "fake"}


def test_statistics_kernel_cuda_branch_faked(tmp_path, monkeypatch, capsys):
    """The CUDA branch of ``main`` with faked measurements: ceiling row named by its
    precision, nominal and executed TFLOP/s, target lines with their ratios, fit summary."""
    pytest.importorskip("triton")
    sk = _statistics_kernel()
    import torch

    monkeypatch.setattr(sk.common, "pick_device", lambda *a: torch.device("cuda"))
    monkeypatch.setattr(sk.common, "metadata", lambda device: {"device": "Fake GPU", "commit": "c0ffee",
                                                              "torch": "x", "triton": "y", "threads": 1})
    monkeypatch.setattr(sk, "triton_unavailable_reason", lambda on_cuda: None)
    monkeypatch.setattr(sk, "measure_ceiling", lambda meta, note: (
        50.0, {**meta, "implementation": "matmul_fp32", "mode": "forward", "G": 1, "N": 8192, "D": 8192,
               "status": "ok", "tflops_nominal": 50.0}))
    monkeypatch.setattr(sk, "measure_point_cuda", _fake_cuda_point)
    assert sk.main(["--device", "cuda", "--g", "8", "--n", "2048", "4096", "16384", "--d", "256",
                    "--modes", "forward+backward", "--no-plots", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    target_lines = [line for line in out.splitlines() if "->" in line]
    assert len(target_lines) == 3 and all(line.endswith("PASS") for line in target_lines), out
    assert "5.00x faster, memory 0.0250" in out  # reference 40 ms / triton 8 ms; 100 / 4000 MiB
    assert "6.25x faster, 50.0x less memory" in out  # the baseline
    assert "0.419 GB" in out  # 100 MiB * 4 at N = 16384, in units of 1e9 bytes
    assert "baseline forward+backward G=8 D=256: N=4096 (OOM at N=16384)" in out
    assert "reference forward+backward G=8 D=256: N>=16384 (no OOM in sweep)" in out
    assert "errors at N=2048" in out

    rows = _read(tmp_path / "statistics_kernel.csv")
    assert rows[0]["implementation"] == "matmul_fp32"
    triton = next(r for r in rows if r["implementation"] == "triton" and r["N"] == "4096")
    nominal = 16 * 8 * 4096**2 * 256 / 8e-3 / 1e12
    assert float(triton["tflops_nominal"]) == pytest.approx(nominal)
    assert float(triton["pct_of_ceiling"]) == pytest.approx(100 * nominal / 50.0)
    executed = float(triton["flops_executed_n2d"])
    assert executed >= 10 and float(triton["tflops_executed"]) == pytest.approx(nominal * executed / 16)
    assert next(r for r in rows if r["implementation"] == "triton" and r["N"] == "2048")["status"].startswith("error")


def test_statistics_kernel_targets_not_measured_and_cpu():
    sk = _statistics_kernel()
    lines = sk.evaluate_targets([], on_cuda=True)
    assert len(lines) == 4 and all("not measured in this run" in line for line in lines)
    point = {"mode": "forward+backward", "G": 1, "N": 4096, "D": 64, "status": "ok", "kernel": "cosine"}
    rows = [{**point, "implementation": "reference", "time_median_ms": 100.0, "peak_mem_mb": 400.0},
            {**point, "implementation": "torch", "time_median_ms": 160.0, "peak_mem_mb": 16.0}]
    (line,) = [line for line in sk.evaluate_targets(rows, on_cuda=False) if line.startswith("CPU")]
    assert "time 1.60x" in line and "memory 0.0400" in line and line.endswith("FAIL")


def test_paper_point_in_default_sweep_only():
    sk = _statistics_kernel()
    import argparse

    def args(**kw):
        base = {"n": None, "d": None, "g": None, "quick": False, "paper_point": "auto", "modes": list(sk.MODES)}
        return argparse.Namespace(**{**base, **kw})

    impls = ["reference", "torch", "triton", "baseline"]
    full = sk.sweep_points(args(), on_cuda=True, impls=impls)
    assert (full[-1].g, full[-1].n, full[-1].d) == (1, 232, 100352)
    assert full[-1].implementations == ("reference", "torch", "triton") and full[-1].modes == ("forward+backward",)
    assert all(p.d != 100352 for p in sk.sweep_points(args(quick=True), on_cuda=False, impls=impls))
    assert all(p.d != 100352 for p in sk.sweep_points(args(n=[256]), on_cuda=False, impls=impls))
    only = sk.sweep_points(args(paper_point="only"), on_cuda=False, impls=impls)
    assert [(p.g, p.n, p.d) for p in only] == [(1, 232, 100352)]


def test_append_rows_adds_columns_once(tmp_path):
    sk = _statistics_kernel()
    common = sk.common
    path = tmp_path / "t.csv"
    common.append_rows(path, [{"a": 1, "tflops": 2}], ["a", "tflops"])
    common.append_rows(path, [{"a": 3, "tflops_nominal": 4}], ["a", "tflops_nominal"])
    common.append_rows(path, [{"a": 5, "tflops_nominal": 6}], ["a", "tflops_nominal"])
    with open(path) as f:
        assert f.readline().strip() == "a,tflops,tflops_nominal"
    rows = _read(path)
    got = [(r["a"], r["tflops"], r["tflops_nominal"]) for r in rows]
    assert got == [("1", "2", ""), ("3", "", "4"), ("5", "", "6")]
    assert not list(tmp_path.glob("*.tmp"))

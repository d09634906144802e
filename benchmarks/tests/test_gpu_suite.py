"""The GPU suite rehearsed on the CPU: every step runs at tiny sizes, one is made to fail, one
is skipped by the time guard, the output folder is what would come back from the GPU machine,
and ``home`` merges it (once), plots it and judges it. The time guard's stop of an overrunning
step and the error path of an in-process step are checked on the runner itself."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_suite as gs
from benchmarks import results


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_runner_records_ok_failed_timed_out_and_skipped(tmp_path):
    log = gs.Log(tmp_path / "suite.log")
    pids = tmp_path / "grandchild.pid"

    def broken() -> dict:
        raise RuntimeError("no device")

    steps = [
        gs.Step("fine", "exits 0", 0.1, argv=_python("print('hello from a step')")),
        gs.Step("exits-3", "exits 3", 0.1, argv=_python("import sys; print('bad'); sys.exit(3)")),
        gs.Step("raises", "an in-process step that raises", 0.1, call=broken),
        gs.Step("overruns", "sleeps past its limit, with a child of its own", 0.5, limit_s=2.0,
                argv=_python("import subprocess, sys, time; "
                             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                             f"open({str(pids)!r}, 'w').write(str(p.pid)); "
                             "print('started', flush=True); time.sleep(60)")),
        gs.Step("too-big", "estimate above the budget left", 1000.0, argv=_python("print('never')")),
    ]
    seen = []
    outcomes = gs.run_steps(steps, budget_s=60, log=log, env=dict(os.environ), on_outcome=seen.append)
    log.file.close()
    status = {o.name: o.status for o in outcomes}
    assert status == {"fine": "ok", "exits-3": "failed", "raises": "failed", "overruns": "timed out",
                      "too-big": "skipped"}
    assert [o.name for o in seen] == [s.name for s in steps]  # the record is written after every step
    by_name = {o.name: o for o in outcomes}
    assert "exit code 3" in by_name["exits-3"].detail
    assert "RuntimeError: no device" in by_name["raises"].detail
    assert 1.5 < by_name["overruns"].elapsed_s < 20  # stopped at its limit, not after 60 s
    assert not _alive(int(pids.read_text()))  # with its whole process group
    assert "budget left" in by_name["too-big"].detail
    text = (tmp_path / "suite.log").read_text()
    assert "hello from a step" in text and "started" in text and "never" not in text


def test_budget_runs_out_mid_step(tmp_path):
    """A step is stopped when the budget ends, even before its own limit; later steps are skipped."""
    log = gs.Log(tmp_path / "suite.log")
    steps = [gs.Step("long", "sleeps", 0.5, argv=_python("import time; time.sleep(60)")),
             gs.Step("after", "would run", 0.5, argv=_python("pass"))]
    outcomes = gs.run_steps(steps, budget_s=2.5, log=log, env=dict(os.environ))
    log.file.close()
    assert [o.status for o in outcomes] == ["timed out", "skipped"]
    assert outcomes[0].elapsed_s < 20


def test_pytest_summary_line():
    assert gs.pytest_summary(["...", "==== 2 failed, 72 passed in 46.69s ===="]) == "2 failed, 72 passed in 46.69s"
    assert gs.pytest_summary(["28 skipped in 0.98s"]) == "28 skipped in 0.98s"
    assert gs.pytest_summary(["no summary here"]) == ""


def test_rehearsal_then_home(tmp_path, checkout):
    out, wheels = tmp_path / "out", tmp_path / "no-wheels"
    wheels.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "run", "--device", "cpu", "--rehearsal", "--out", str(out),
         "--budget", "1500", "--fail-step", "profile", "--estimate", "study=100000", "--wheels", str(wheels)],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    record = json.loads((out / "suite.json").read_text())
    status = {step["name"]: step["status"] for step in record["steps"]}
    planned = [step.name for step in gs.plan(argparse.Namespace(out=out, device="cpu", rehearsal=True, estimate=[],
                                                                fail_step=None))]
    assert list(status) == planned  # every step, in order
    assert status.pop("profile") == "failed"  # the error path
    assert status.pop("study") == "skipped"  # the time guard
    assert set(status.values()) == {"ok"}, record["steps"]
    assert record["environment"]["device"].startswith("CPU") and record["environment"]["torch"]
    assert "failed on purpose" in (out / "suite.log").read_text()

    # What would come back from the GPU machine: flat, at most eight files, only planned names.
    assert gs.check_layout(out) == []
    names = {p.name for p in out.iterdir()}
    assert names <= {gs.LOG_NAME, gs.RECORD_NAME, gs.PROFILE_NAME, *gs.CSV_HOMES}
    assert {"statistics_kernel.csv", "loss_overhead.csv", "queue_cost.csv", "triton_configs.csv"} <= names
    for name in names - {gs.LOG_NAME, gs.RECORD_NAME}:
        if name.endswith(".csv"):
            rows = results.read_rows(out / name)
            assert rows and all(row.get("date") and row.get("commit") for row in rows if "run_id" in row), name

    # Home: merged once, the run's files kept, plots drawn, targets judged, table rows printed.
    res, study = tmp_path / "results", tmp_path / "study"
    res.mkdir()
    study.mkdir()
    home = [sys.executable, "-m", "benchmarks.gpu_suite", "home", str(out), "--results", str(res),
            "--study-results", str(study)]
    first = subprocess.run(home, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name in ("statistics_kernel.csv", "loss_overhead.csv", "queue_cost.csv", "triton_configs.csv"):
        assert len(results.read_rows(res / name)) == len(results.read_rows(out / name)), name
    assert any(res.glob("statistics_kernel_*.png")) and any(res.glob("loss_overhead_*.png"))
    kept = next((res / "gpu_runs").iterdir())
    assert {gs.LOG_NAME, gs.RECORD_NAME} <= {p.name for p in kept.iterdir()}
    assert "training step, overhead" in first.stdout and "| target | measured | verdict |" in first.stdout

    again = subprocess.run(home, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "0 rows appended" in again.stdout
    for name in ("statistics_kernel.csv", "loss_overhead.csv"):
        assert len(results.read_rows(res / name)) == len(results.read_rows(out / name)), name

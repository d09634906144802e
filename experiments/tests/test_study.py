"""The study's statistics checked against independent computations, and a smoke run of the
study driver (random backbone, a few steps)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

for _module in ("skimage", "sklearn", "matplotlib", "tqdm", "PIL"):
    pytest.importorskip(_module)

from experiments import study, study_report  # noqa: E402


def _t_cdf(q: float, dof: int) -> float:
    """Student's t CDF at q > 0 by Simpson's rule on the density (no table, no scipy)."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    x = np.linspace(0.0, q, 40001)
    f = c * (1 + x**2 / dof) ** (-(dof + 1) / 2)
    h = x[1] - x[0]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 7, 11, 19, 30, 31, 45, 120])
def test_t_quantile_matches_the_integrated_density(dof):
    q = study_report.t_quantile_975(dof)
    # the table has 3 decimals: the CDF may be off by at most 0.0005 * density(q)
    assert _t_cdf(q, dof) == pytest.approx(0.975, abs=4e-5)


def test_t_quantile_rejects_bad_dof():
    for dof in (0, -2, 2.5):
        with pytest.raises(ValueError, match="dof"):
            study_report.t_quantile_975(dof)


def test_mean_ci_on_a_constructed_case():
    values = [0.3, -0.1, 0.5, 0.2, 0.05]
    mean, low, high = study_report.mean_ci(values)
    a = np.asarray(values)
    half = 2.776 * a.std(ddof=1) / math.sqrt(len(a))  # t_{0.975, 4} from a printed table
    assert mean == pytest.approx(a.mean(), abs=1e-12)
    assert (low, high) == pytest.approx((a.mean() - half, a.mean() + half), abs=1e-12)
    assert math.isnan(study_report.mean_ci([1.0])[1])
    with pytest.raises(ValueError):
        study_report.mean_ci([])


def test_mean_ci_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    samples = rng.normal(1.5, 2.0, size=(4000, 3))  # n = 3: the t quantile matters (4.30 vs 1.96)
    covered = [low <= 1.5 <= high for low, high in (study_report.mean_ci(list(s))[1:] for s in samples)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.012)


def test_paired_differences_pair_by_seed():
    rows = [
        {"config": "l1", "seed": "0", "metric": "psnr", "value": "20.0"},
        {"config": "l1", "seed": "1", "metric": "psnr", "value": "21.0"},
        {"config": "l1", "seed": "2", "metric": "psnr", "value": "22.5"},
        {"config": "c", "seed": "1", "metric": "psnr", "value": "21.25"},
        {"config": "c", "seed": "0", "metric": "psnr", "value": "19.5"},
        {"config": "c", "seed": "0", "metric": "ssim", "value": "0.9"},
        {"config": "c", "seed": "3", "metric": "psnr", "value": "30.0"},  # no baseline for seed 3
    ]
    assert study_report.paired_differences(rows, "c", "psnr") == {"0": -0.5, "1": 0.25}


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_study_smoke_run_pairs_runs_and_resumes(tmp_path):
    out = tmp_path / "study_smoke.csv"
    argv = ["--random-backbone", "--seeds", "2", "--steps", "2", "--batch-size", "2", "--crop", "48",
            "--depth", "3", "--width", "4", "--test-per-image", "2", "--test-crop", "64",
            "--ratios", "0,0.3", "--depths", "deepest", "--granularities", "image", "--out", str(out)]
    study.main(argv)
    rows = _read(out)
    assert {r["backbone_weights"] for r in rows} == {"RANDOM (--random-backbone)"}
    assert {r["commit"] for r in rows} and all(r["device"].startswith("CPU") for r in rows)
    configs = {"l1", "d2sm_deepest_image_r0", "d2sm_deepest_image_r0.3"}
    for config in configs:
        for seed in ("0", "1"):
            found = {r["metric"] for r in rows if r["config"] == config and r["seed"] == seed}
            assert {"psnr", "ssim", "kl", "top1_agreement", "final_l1", "train_seconds"} <= found, (config, seed)
    # weight 0: the same initialisation and batches as the L1 run, so the same figures
    for metric in ("psnr", "ssim", "kl", "top1_agreement", "final_l1"):
        assert set(study_report.paired_differences(rows, "d2sm_deepest_image_r0", metric).values()) == {0.0}
    # the weight was calibrated to the target gradient ratio (rounded to 2 significant digits)
    ratios = study_report.values_by_seed(rows, "d2sm_deepest_image_r0.3", "grad_ratio_init")
    assert np.mean(list(ratios.values())) == pytest.approx(0.3, rel=0.06)
    assert all(math.isfinite(float(r["value"])) for r in rows)
    # a second run finds every row and trains nothing
    study.main(argv)
    assert len(_read(out)) == len(rows)
    text = study_report.main([str(out)])
    assert "RANDOM" in text and "deepest / image / r 0.3" in text
    assert out.with_suffix(".png").stat().st_size > 0


def test_ratio_trace_runs(capsys):
    study.main(["--ratio-trace", "--random-backbone", "--steps", "3", "--batch-size", "2", "--crop", "48",
                "--depth", "3", "--width", "4", "--depths", "middle", "--granularities", "image,location"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["steps", "middle/image", "middle/location"]
    assert [int(line.split()[0]) for line in lines[1:]] == [0, 1, 3]
    assert all(float(v) > 0 and math.isfinite(float(v)) for line in lines[1:] for v in line.split()[1:])

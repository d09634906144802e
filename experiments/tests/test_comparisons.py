"""The reference comparisons: degradations checked against their definitions, and each
comparison run end to end in a tiny configuration (random weights, a few steps, two small test
images)."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

for _module in ("skimage", "sklearn", "matplotlib", "tqdm", "PIL"):
    pytest.importorskip(_module)

from experiments import data, degradations, models, report  # noqa: E402

# --------------------------------------------------------------------------- degradations


def test_gaussian_noise_std_matches_sigma_on_a_flat_image():
    clean = torch.full((1, 3, 512, 512), 0.5)
    noisy = degradations.add_gaussian_noise(clean, 25 / 255, torch.Generator().manual_seed(0))
    noise = noisy - clean
    assert abs(noise.std().item() - 25 / 255) < 0.01 * 25 / 255
    assert abs(noise.mean().item()) < 1e-3
    assert noisy.min() < 0.5 - 3 * 25 / 255  # not clipped


def test_gaussian_noise_blind_range_draws_one_sigma_per_image():
    clean = torch.zeros(64, 1, 64, 64)
    noisy = degradations.add_gaussian_noise(clean, (5 / 255, 50 / 255), torch.Generator().manual_seed(1))
    stds = noisy.flatten(1).std(dim=1)
    assert stds.min() > 5 / 255 * 0.9 and stds.max() < 50 / 255 * 1.1
    assert stds.max() - stds.min() > 20 / 255  # actually varies


def test_noise_is_reproducible_from_the_generator():
    clean = torch.rand(2, 3, 16, 16)
    a = degradations.add_gaussian_noise(clean, 0.1, torch.Generator().manual_seed(3))
    b = degradations.add_gaussian_noise(clean, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_downsample_sizes_and_constant_image(scale):
    image = torch.rand(2, 3, 12 * scale, 8 * scale)
    low = degradations.bicubic_downsample(image, scale)
    assert low.shape == (2, 3, 12, 8)
    assert low.min() >= 0 and low.max() <= 1
    flat = torch.full((1, 3, 4 * scale, 4 * scale), 0.3)
    assert torch.allclose(degradations.bicubic_downsample(flat, scale), torch.full((1, 3, 4, 4), 0.3), atol=1e-5)
    assert degradations.bicubic_upsample(low, scale).shape == image.shape
    assert models.ESPCN(scale, width=8)(low).shape == image.shape


def test_bicubic_downsample_rejects_sizes_not_multiple_of_scale():
    with pytest.raises(ValueError, match="multiple"):
        degradations.bicubic_downsample(torch.rand(1, 3, 10, 9), 2)


def test_depth_proxy_is_normalised_and_far_at_the_top():
    depth = degradations.depth_proxy(torch.full((2, 3, 40, 30), 0.5))
    assert depth.shape == (2, 1, 40, 30)
    assert depth.min().item() == pytest.approx(0.0, abs=1e-6) and depth.max().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(depth[:, :, 0] > depth[:, :, -1])


def test_haze_follows_the_scattering_model():
    clean = torch.rand(8, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    hazy, t, airlight = degradations.add_haze(clean, torch.Generator().manual_seed(1), (0.5, 1.5), (0.7, 1.0))
    assert hazy.shape == clean.shape and t.shape == (8, 1, 48, 64) and airlight.shape == (8, 1, 1, 1)
    assert t.min() > 0 and t.max() <= 1
    assert t.min() >= math.exp(-1.5) - 1e-6
    assert airlight.min() >= 0.7 and airlight.max() <= 1.0
    assert torch.allclose(hazy, clean * t + airlight * (1 - t), atol=1e-6)
    # t = exp(-beta d) with one beta per image: -log(t) / d is constant where d > 0
    depth = degradations.depth_proxy(clean)
    ratio = (-torch.log(t) / depth.clamp_min(1e-3))[depth > 0.2].view(-1)
    beta = -torch.log(t.flatten(1).min(dim=1).values)  # d reaches 1 in every image
    assert beta.min() >= 0.5 - 1e-5 and beta.max() <= 1.5 + 1e-5
    assert ratio.min() >= 0.5 - 1e-4 and ratio.max() <= 1.5 + 1e-4
    assert hazy.min() >= 0 and hazy.max() <= 1  # a convex combination of values in [0, 1]


# --------------------------------------------------------------------------- data and models


def test_builtin_split_is_disjoint():
    assert not set(data.BUILTIN_TRAIN) & set(data.BUILTIN_TEST)


def test_paired_file_matching():
    files = [Path("0001x2.png"), Path("00010x2.png"), Path("0002_0.8_0.2.jpg")]
    assert data.match_degraded(Path("0001.png"), files).name == "0001x2.png"
    assert data.match_degraded(Path("0002.png"), files).name == "0002_0.8_0.2.jpg"
    with pytest.raises(FileNotFoundError):
        data.match_degraded(Path("0003.png"), files)


def test_sample_batch_keeps_pairs_aligned():
    # a degraded image made by 2x2 average pooling commutes exactly with crops on the 2-pixel
    # grid and with flips, so aligned pairs satisfy pool(clean patch) == degraded patch
    clean = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(0))
    sample = data.Sample("x", clean, torch.nn.functional.avg_pool2d(clean[None], 2)[0])
    c, d = data.sample_batch([sample], 8, 16, 2, torch.Generator().manual_seed(0))
    assert c.shape == (8, 3, 16, 16) and d.shape == (8, 3, 8, 8)
    assert torch.allclose(torch.nn.functional.avg_pool2d(c, 2), d, atol=1e-6)


@pytest.mark.parametrize("model", [models.DnCNN(depth=3, width=8), models.AODNet()])
def test_same_size_models(model):
    x = torch.rand(1, 3, 20, 24)
    assert model(x).shape == x.shape


# --------------------------------------------------------------------------- end to end

TINY = ["--random-backbone", "--steps", "3", "--batch-size", "2", "--crop", "48", "--eval-size", "64",
        "--num-test", "2", "--log-every", "1"]


def _check_report(out: Path, results: dict) -> None:
    saved = json.loads((out / "results.json").read_text())
    assert saved["random_backbone"] is True and saved["warning"] == report.RANDOM_STAMP
    assert (out / "curves.png").stat().st_size > 0
    assert len(saved["per_image"]) == 2
    for row in saved["per_image"]:
        assert (out / f"grid_{row['name']}.png").stat().st_size > 0
    for name in ("degraded", "l1", "l1+d2sm"):
        for key, value in saved["summary"][name].items():
            assert math.isfinite(value), (name, key, value)
    assert all(math.isfinite(v) for v in saved["difference_l1+d2sm_minus_l1"].values())
    for run in ("l1", "l1+d2sm"):
        assert all(math.isfinite(v) for v in saved["runs"][run]["history"]["l1"])
        assert all(math.isfinite(v) for v in saved["runs"][run]["history"]["d2sm"])
    assert results["summary"] == saved["summary"]


@pytest.mark.parametrize(
    "script, extra",
    [("denoising", ["--depth", "3", "--width", "8"]),
     ("denoising", ["--depth", "3", "--width", "8", "--sigma-range", "5,50"]),
     ("super_resolution", ["--scale", "4", "--width", "8"]),
     ("dehazing", [])],
)
def test_example_end_to_end(script, extra, tmp_path):
    module = importlib.import_module(f"experiments.{script}")
    results = module.main(TINY + extra + ["--out", str(tmp_path)])
    _check_report(tmp_path, results)
    assert results["example"] == script


def test_runs_differ_only_by_the_loss(tmp_path):
    """With loss weight 0 the two runs are the same computation: identical figures."""
    from experiments import denoising

    results = denoising.main(TINY + ["--depth", "3", "--width", "8", "--loss-weight", "0", "--out", str(tmp_path)])
    assert results["summary"]["l1"] == results["summary"]["l1+d2sm"]

"""The messages a framework user meets first: values outside input_range (with the observed
ranges, and whether it matters), and images or batches too small (with the config entry to change)."""

from __future__ import annotations

import warnings

import pytest
import torch

from d2sm_loss import SemanticStatisticsLoss


def _loss(**kwargs) -> SemanticStatisticsLoss:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return SemanticStatisticsLoss("resnet10t", pretrained=False, **kwargs)


def _images(batch: int = 3, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(batch, 3, size, size, generator=generator)
    restored = (clean + 0.05 * torch.randn(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return restored, clean


def _range_warning(criterion, restored, clean) -> str:
    with pytest.warns(UserWarning, match="input_range") as record:
        criterion(restored, clean)
    (message,) = [str(w.message) for w in record if "input_range" in str(w.message)]
    return message


def test_early_overshoot_states_the_range_and_that_it_is_harmless():
    restored, clean = _images()
    for output in (restored * 1.1 - 0.05, restored * 6 - 3):  # an unclamped output, a little or far out
        message = _range_warning(_loss(), output, clean)
        low, high = output.min().item(), output.max().item()
        assert f"restored values span [{low:.4g}, {high:.4g}]" in message
        assert "network's output" in message and "harmless" in message and "clamp" in message


def test_images_in_another_range_state_it_matters():
    restored, clean = _images()
    for scale, shift in ((255, 0), (2, -1), (1.2, 0)):  # [0, 255], [-1, 1], a little out: given for (0, 1)
        message = _range_warning(_loss(), restored * scale + shift, clean * scale + shift)
        low, high = (clean * scale + shift).min().item(), (clean * scale + shift).max().item()
        assert f"clean values span [{low:.4g}, {high:.4g}]" in message
        assert "clean images are outside" in message and "loss are wrong" in message and "harmless" not in message


def test_too_small_images_name_the_config_entry():
    criterion = _loss()
    restored, clean = _images(size=20)
    with pytest.raises(ValueError, match="too small") as error:
        criterion(restored, clean)
    assert "gt_size in BasicSR, lq_size in traiNNer-redux" in str(error.value) and "layers=" in str(error.value)


def test_a_single_image_names_the_batch_size_entry():
    criterion = _loss()
    restored, clean = _images(batch=1)
    with pytest.raises(ValueError, match="single image") as error:
        criterion(restored.requires_grad_(), clean)
    assert "batch_size_per_gpu" in str(error.value)

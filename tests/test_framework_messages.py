"""The messages a framework user meets first: values outside input_range (with the observed
ranges, and whether it matters), and images or batches too small (with what to enlarge, in the
core's own words: the frameworks' config keys are added by the adapters, tested in
tests/integrations/test_config_keys.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from d2sm_loss import SemanticStatisticsLoss
from d2sm_loss.checks import InputSizeError


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


FRAMEWORK_WORDS = ("BasicSR", "traiNNer", "gt_size", "lq_size", "batch_size_per_gpu")


def test_too_small_images_say_what_to_enlarge_without_framework_words():
    criterion = _loss()
    restored, clean = _images(size=20)
    with pytest.raises(InputSizeError, match="too small") as error:
        criterion(restored, clean)
    message = str(error.value)
    assert "larger images or crops" in message and "layers=" in message and error.value.remedy == "image"
    assert not any(word in message for word in FRAMEWORK_WORDS), message


def test_a_single_image_says_to_enlarge_the_batch_without_framework_words():
    criterion = _loss()
    restored, clean = _images(batch=1)
    with pytest.raises(InputSizeError, match="single image") as error:
        criterion(restored.requires_grad_(), clean)
    message = str(error.value)
    assert "larger batch" in message and error.value.remedy == "batch"
    assert not any(word in message for word in FRAMEWORK_WORDS), message

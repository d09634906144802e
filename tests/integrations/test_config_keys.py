"""The adapters add their framework's config key to the core's size errors: a BasicSR or
traiNNer-redux user reads which entry of the config to change."""

from __future__ import annotations

import warnings

import pytest
import torch

from d2sm_loss.checks import InputSizeError
from d2sm_loss.integrations import basicsr_losses, trainner_losses

OPTIONS = {"backbone": "resnet10t", "pretrained": False}


def _adapters():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return [
            ("gt_size in BasicSR", basicsr_losses.D2SMLoss(1.0, **OPTIONS)),
            ("gt_size in BasicSR", basicsr_losses.D2SMPerceptualLoss(1.0, **OPTIONS)),
            ("lq_size in traiNNer-redux", trainner_losses.D2SMLoss(1.0, **OPTIONS)),
        ]


def _images(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(batch, 3, size, size, generator=generator)
    return clean.flip(-1).requires_grad_(), clean


def test_too_small_images_name_the_image_size_key():
    for key, loss in _adapters():
        with pytest.raises(InputSizeError, match="too small") as error:
            loss(*_images(batch=3, size=20))
        assert key in str(error.value) and "layers=" in str(error.value), (type(loss), str(error.value))


def test_a_single_image_names_the_batch_size_key():
    for _, loss in _adapters():
        with pytest.raises(InputSizeError, match="single image") as error:
            loss(*_images(batch=1, size=48))
        assert "batch_size_per_gpu" in str(error.value), (type(loss), str(error.value))


def test_other_errors_pass_unchanged():
    _, loss = _adapters()[0]
    with pytest.raises(ValueError, match="same shape") as error:
        loss(*_images(batch=3, size=48)[:1], torch.rand(2, 3, 48, 48))
    assert "config key" not in str(error.value)

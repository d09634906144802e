"""The documented recipes for backbones beyond VGG (docs/guides/backbones.md), run with random
weights (no download): DINOv2 ViT-S/14 and ConvNeXt-T with the perceptual, style and D2SM terms."""

from __future__ import annotations

import warnings

import pytest
import torch

from d2sm_loss import SemanticStatisticsLoss
from d2sm_loss.perceptual import FeatureLosses

timm = pytest.importorskip("timm")

DINOV2 = "vit_small_patch14_dinov2"


def _build(cls, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return cls(*args, pretrained=False, **kwargs)


def _pair(height: int, width: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(batch, 3, height, width, generator=generator)
    restored = (clean + 0.1 * torch.randn(batch, 3, height, width, generator=generator)).clamp(0, 1)
    return restored.requires_grad_(), clean


def _check_terms(terms: dict[str, torch.Tensor], restored: torch.Tensor) -> None:
    assert set(terms) == {"perceptual", "style", "d2sm"}
    assert all(torch.isfinite(value) and value > 0 for value in terms.values()), terms
    (grad,) = torch.autograd.grad(sum(terms.values()), restored)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_dinov2_recipe_with_sides_multiple_of_14():
    losses = _build(
        FeatureLosses, DINOV2, {5: 1.0}, style_weight=1.0, d2sm_layer_weights={11: 1.0},
        backbone_kwargs={"dynamic_img_size": True},
    )
    assert losses.layers == ["blocks.5", "blocks.11"]
    restored, clean = _pair(70, 84)
    maps = losses.feature_maps(clean)
    assert [tuple(m.shape) for m in maps] == [(3, 384, 5, 6)] * 2  # tokens on the 14-pixel patch grid
    _check_terms(losses(restored, clean), restored)


def test_dinov2_sides_not_multiple_of_14_name_the_fix():
    losses = _build(FeatureLosses, DINOV2, {5: 1.0}, backbone_kwargs={"dynamic_img_size": True})
    with pytest.raises(ValueError, match="must be a multiple of 14 .*dynamic_img_pad"):
        losses(*_pair(64, 64))
    padded = _build(FeatureLosses, DINOV2, {5: 1.0}, style_weight=1.0,
                    backbone_kwargs={"dynamic_img_size": True, "dynamic_img_pad": True})
    restored, clean = _pair(64, 64)
    assert padded.feature_maps(clean)[0].shape[-2:] == (5, 5)  # ceil(64 / 14)
    _check_terms(padded(restored, clean), restored)
    fixed = _build(SemanticStatisticsLoss, DINOV2)
    with pytest.raises(ValueError, match="exactly 518x518"):
        fixed(*_pair(70, 70))


def test_convnext_recipe():
    losses = _build(FeatureLosses, "convnext_tiny", {0: 0.5, 1: 1.0}, style_weight=1.0)
    assert losses.layers == ["stages.0", "stages.1", "stages.3"]  # D2SM at the deepest stage by default
    restored, clean = _pair(64, 64)
    _check_terms(losses(restored, clean), restored)
    with pytest.raises(ValueError, match="too small"):
        losses(*_pair(24, 24))


@pytest.mark.parametrize(("name", "hub_id"), [
    (DINOV2, "timm/vit_small_patch14_dinov2.lvd142m"), ("convnext_tiny", "timm/convnext_tiny.in12k_ft_in1k"),
])
def test_what_pretrained_true_downloads(name, hub_id):
    # the guide names these: pretrained=True fetches them from the Hugging Face hub
    with torch.device("meta"):
        config = timm.create_model(name, pretrained=False).pretrained_cfg
    assert config["hf_hub_id"] == hub_id
    assert tuple(config["mean"]) == (0.485, 0.456, 0.406) and tuple(config["std"]) == (0.229, 0.224, 0.225)

"""The D2SM loss with BasicSR's loss conventions, in a module that does not import BasicSR.

BasicSR (and the many repositories that vendor a copy of it: NAFNet, Restormer, HAT...)
builds a loss from a config entry ``{type: NAME, **options}``: it looks ``NAME`` up (in its
``LOSS_REGISTRY``, or as an attribute of the vendored ``basicsr.models.losses`` module) and
calls ``cls(**options)``. Its losses apply their own weight, and the model adds up what they
return:

- the ``pixel_opt`` slot calls ``loss(output, gt)`` and adds the tensor it returns;
  :class:`D2SMLoss` returns ``loss_weight * D2SM(output, gt)``;
- the ``perceptual_opt`` slot calls ``percep, style = loss(output, gt)`` and adds each item
  that is not None; :class:`D2SMPerceptualLoss` returns
  ``(perceptual_weight * D2SM(output, gt), None)``, and :class:`PerceptualD2SMLoss` (BasicSR's
  ``PerceptualLoss`` with D2SM from the same VGG pass) ``(perceptual + d2sm, style)``.

Every other option is an argument of :class:`~d2sm_loss.SemanticStatisticsLoss`.
``layer_weights`` may also be given the BasicSR way, as a mapping ``{layer: weight}``; with
the ``"vgg19"`` backbone, BasicSR's VGG layer names (``conv5_4``, ``relu4_4``...) are taken
too and mean the same layers (``conv5_4`` is ``features.34``).

A vendored copy registers both classes with one line in its losses module::

    from d2sm_loss.integrations.basicsr_losses import D2SMLoss, D2SMPerceptualLoss, PerceptualD2SMLoss  # noqa: F401

and the installed BasicSR with ``import d2sm_loss.integrations.basicsr``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..checks import check_bool, check_number
from ..layers import LayerSpec
from ..loss import SemanticStatisticsLoss
from ..perceptual import FeatureLosses, vgg_layer_names
from ._config_keys import BASICSR_KEYS, call_with_config_keys

__all__ = ["BASICSR_VGG_PATH", "D2SMLoss", "D2SMPerceptualLoss", "PerceptualD2SMLoss", "VGG19_LAYER_NAMES"]

#: Where BasicSR's ``VGGFeatureExtractor`` reads VGG19's weights from, relative to the
#: working directory, before it downloads torchvision's.
BASICSR_VGG_PATH = os.path.join("experiments", "pretrained_models", "vgg19-dcbb9e9d.pth")
#: ImageNet's mean and std, which BasicSR's ``use_input_norm=True`` applies.
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


#: BasicSR's VGG19 layer names and the ``features.N`` module each one is.
VGG19_LAYER_NAMES = vgg_layer_names("vgg19")


def _loss_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of :class:`SemanticStatisticsLoss`, with a BasicSR-style
    ``layer_weights`` mapping turned into ``layers`` and ``layer_weights``."""
    layer_weights = options.get("layer_weights")
    if isinstance(layer_weights, Mapping):
        if options.get("layers") is not None:
            raise ValueError(
                "layers and a layer_weights mapping both name layers: give either layer_weights={layer: weight} "
                "or layers=[...] with layer_weights=[...]"
            )
        if not layer_weights:
            raise ValueError("layer_weights must map at least one layer to its weight, got an empty mapping")
        vgg19 = options.get("backbone", "vgg19") == "vgg19"
        options = dict(options)
        options["layers"] = [VGG19_LAYER_NAMES.get(str(name), name) if vgg19 else name for name in layer_weights]
        options["layer_weights"] = list(layer_weights.values())
    return options


class D2SMLoss(SemanticStatisticsLoss):
    """The D2SM loss for BasicSR's ``pixel_opt`` slot: ``loss_weight * D2SM(pred, target)``.

    Args:
        loss_weight: the weight BasicSR losses apply themselves (a finite number).
        **options: the arguments of :class:`~d2sm_loss.SemanticStatisticsLoss`
            (``layer_weights`` may be a ``{layer: weight}`` mapping).
    """

    def __init__(self, loss_weight: float = 1.0, **options: Any) -> None:
        super().__init__(**_loss_options(options))
        self.loss_weight = check_number("loss_weight", loss_weight)

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``loss_weight`` times the loss between ``pred`` (restored) and ``target`` (clean)."""
        if weight is not None:
            raise ValueError(
                "weight: D2SM compares images with each other, so per-pixel weights do not apply; "
                "call it without weight"
            )
        return self.loss_weight * call_with_config_keys(BASICSR_KEYS, super().forward, pred, target)


class D2SMPerceptualLoss(SemanticStatisticsLoss):
    """The D2SM loss for BasicSR's ``perceptual_opt`` slot: returns
    ``(perceptual_weight * D2SM(pred, target), None)``, BasicSR's ``(percep, style)`` pair.

    Args:
        perceptual_weight: the weight of the loss (a finite number). 0 returns
            ``(None, None)`` without running the backbone, as BasicSR's PerceptualLoss does.
        style_weight: accepted so that a PerceptualLoss entry can be reused; D2SM has no
            style term, so it must be 0.
        **options: the arguments of :class:`~d2sm_loss.SemanticStatisticsLoss`
            (``layer_weights`` may be a ``{layer: weight}`` mapping).
    """

    def __init__(self, perceptual_weight: float = 1.0, style_weight: float = 0.0, **options: Any) -> None:
        if check_number("style_weight", style_weight) != 0:
            raise ValueError(f"style_weight: D2SM has no style term, so it must be 0, got {style_weight}")
        super().__init__(**_loss_options(options))
        self.perceptual_weight = check_number("perceptual_weight", perceptual_weight)

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        """``(perceptual_weight * D2SM(pred, target), None)``."""
        if self.perceptual_weight == 0:
            return None, None
        return self.perceptual_weight * call_with_config_keys(BASICSR_KEYS, super().forward, pred, target), None


class PerceptualD2SMLoss(FeatureLosses):
    """BasicSR's ``PerceptualLoss`` plus D2SM from the same VGG pass, for ``perceptual_opt``.

    Takes ``PerceptualLoss``'s arguments with their meaning and defaults, so that an entry
    switches by changing ``type: PerceptualLoss`` to ``type: PerceptualD2SMLoss`` and adding
    ``d2sm_weight``; returns BasicSR's ``(percep, style)`` pair with
    ``percep = perceptual + d2sm`` (:class:`~d2sm_loss.perceptual.FeatureLosses`'s terms;
    None where both weights are 0) and ``style`` None when ``style_weight`` is 0.
    ``last_terms`` holds the three terms apart for logging.

    Args:
        layer_weights: ``{layer: weight}`` with BasicSR's VGG names (``conv5_4``...).
        vgg_type: the VGG (``vgg19``, ``vgg16``...), built with timm; any timm name works.
        use_input_norm: normalise the [0, 1] images with ImageNet's mean and std.
        range_norm: the images are in [-1, 1] (mapped to [0, 1] first).
        perceptual_weight, style_weight, criterion: as in ``PerceptualLoss`` (``"l1"``,
            ``"l2"`` or ``"fro"``).
        d2sm_weight: the D2SM term's weight (required).
        d2sm_layer_weights: ``{layer: weight}`` of the D2SM term (default ``{conv5_4: 1}``
            for VGG19, the paper's layer).
        **options: the D2SM term's options (``queue_size``, ``save_queue``, ``pretrained``,
            ``checkpoint``...; see :class:`~d2sm_loss.perceptual.FeatureLosses`).

    Weights: like BasicSR, ``vgg19`` reads ``experiments/pretrained_models/vgg19-dcbb9e9d.pth``
    (:data:`BASICSR_VGG_PATH`, relative to the working directory) when that file exists and
    neither ``checkpoint`` nor ``pretrained: false`` is given; otherwise ``pretrained=True``
    finds torchvision's file in torch hub's folder or downloads it (see :mod:`d2sm_loss.features`).
    """

    def __init__(
        self,
        layer_weights: Mapping[LayerSpec, float],
        vgg_type: str = "vgg19",
        use_input_norm: bool = True,
        range_norm: bool = False,
        perceptual_weight: float = 1.0,
        style_weight: float = 0.0,
        criterion: str = "l1",
        *,
        d2sm_weight: float,
        d2sm_layer_weights: Mapping[LayerSpec, float] | None = None,
        **options: Any,
    ) -> None:
        if criterion not in ("l1", "l2", "fro"):
            raise ValueError(
                f"criterion must be one of ('l1', 'l2', 'fro') (BasicSR's PerceptualLoss), got {criterion!r}"
            )
        if not isinstance(vgg_type, str):
            raise TypeError(f"vgg_type must be a timm model name such as 'vgg19', got {vgg_type!r}")
        mean, std = _IMAGENET if check_bool("use_input_norm", use_input_norm) else ((0.0,) * 3, (1.0,) * 3)
        input_range = (-1.0, 1.0) if check_bool("range_norm", range_norm) else (0.0, 1.0)
        pretrained = options.pop("pretrained", True)
        checkpoint = options.pop("checkpoint", None)
        if checkpoint is None and pretrained is True and vgg_type == "vgg19" and os.path.exists(BASICSR_VGG_PATH):
            checkpoint = BASICSR_VGG_PATH
        super().__init__(
            vgg_type, layer_weights, perceptual_weight=perceptual_weight, style_weight=style_weight,
            d2sm_weight=d2sm_weight, criterion=criterion, d2sm_layer_weights=d2sm_layer_weights,
            pretrained=pretrained, checkpoint=checkpoint, mean=mean, std=std, input_range=input_range, **options,
        )

    def forward(self, pred: Tensor, target: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        """``(perceptual + d2sm, style)``; None for a term of weight 0."""
        terms = call_with_config_keys(BASICSR_KEYS, super().forward, pred, target)
        parts = [terms[name] for name in ("perceptual", "d2sm") if name in terms]
        percep = parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else None)
        return percep, terms.get("style")

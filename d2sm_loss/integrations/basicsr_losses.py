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
  ``(perceptual_weight * D2SM(output, gt), None)``.

Every other option is an argument of :class:`~d2sm_loss.SemanticStatisticsLoss`.
``layer_weights`` may also be given the BasicSR way, as a mapping ``{layer: weight}``; with
the ``"vgg19"`` backbone, BasicSR's VGG layer names (``conv5_4``, ``relu4_4``...) are taken
too and mean the same layers (``conv5_4`` is ``features.34``).

A vendored copy registers both classes with one line in its losses module::

    from d2sm_loss.integrations.basicsr_losses import D2SMLoss, D2SMPerceptualLoss  # noqa: F401

and the installed BasicSR with ``import d2sm_loss.integrations.basicsr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..checks import check_number
from ..loss import SemanticStatisticsLoss

__all__ = ["D2SMLoss", "D2SMPerceptualLoss", "VGG19_LAYER_NAMES"]


def _vgg19_layer_names() -> dict[str, str]:
    """BasicSR's VGG19 layer names -> the module names of ``features`` (torchvision's and
    timm's ``vgg19``): conv1_1, relu1_1, conv1_2, relu1_2, pool1, conv2_1, ... pool5."""
    names: dict[str, str] = {}
    index = 0
    for block, convs in enumerate((2, 2, 4, 4, 4), start=1):
        for conv in range(1, convs + 1):
            for kind in ("conv", "relu"):
                names[f"{kind}{block}_{conv}"] = f"features.{index}"
                index += 1
        names[f"pool{block}"] = f"features.{index}"
        index += 1
    return names


#: BasicSR's VGG19 layer names and the ``features.N`` module each one is.
VGG19_LAYER_NAMES = _vgg19_layer_names()


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
        return self.loss_weight * super().forward(pred, target)


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
        return self.perceptual_weight * super().forward(pred, target), None

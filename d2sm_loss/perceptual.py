"""Perceptual, style and D2SM terms from one backbone pass: :class:`FeatureLosses`.

A restoration loop that already runs a VGG perceptual loss (BasicSR's ``PerceptualLoss``,
ESRGAN's configs) pays for each feature loss with its own backbone passes: one on the
restored images with backward, one on the clean images. :class:`FeatureLosses` runs one
frozen backbone once on each batch, at the union of the layers its terms use, and computes
from those maps, for restored maps ``x_l`` and clean maps ``y_l`` (``(B, C, h, w)``) of layer ``l``:

- ``perceptual = perceptual_weight * sum_l w_l * dist(x_l, y_l)``, with ``dist`` the mean
  absolute difference (``"l1"``), the mean squared difference (``"l2"``, also ``"mse"``) or
  the Frobenius norm of the difference over the whole batch (``"fro"``), BasicSR's three, or
  traiNNer-redux's Charbonnier distance (``"charbonnier"``);
- ``style = style_weight * sum_l v_l * dist(G(x_l), G(y_l))``, ``G(f)_b = f_b f_b^T / (C h w)``
  the Gram matrix of each image's ``C x (h w)`` map (BasicSR's normalisation);
- ``d2sm = d2sm_weight * D2SM(x, y)``: :class:`~d2sm_loss.SemanticStatisticsLoss` on its
  own layers' maps (its memory queue, options and checks included).

Each term equals what a separate module computes on the same weights (the tests compare
them with :class:`~d2sm_loss.SemanticStatisticsLoss` and with BasicSR's ``PerceptualLoss``),
at one backbone pass per batch instead of one per module. The clean images' maps carry no
gradient (BasicSR detaches them too).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .checks import check_bool, check_choice, check_image_size, check_images, check_number, check_pair, check_range
from .features import FeatureExtractor
from .layers import DEFAULT_LAYERS, LayerSpec
from .loss import SemanticStatisticsLoss
from .weights import CheckpointSource

__all__ = ["CRITERIA", "FeatureLosses", "feature_distance", "gram_matrix", "vgg_layer_names"]

#: The distances between feature maps and between Gram matrices, BasicSR's ``criterion``
#: values and traiNNer-redux's ``"charbonnier"``.
CRITERIA = ("l1", "l2", "mse", "fro", "charbonnier")

_VGG_BLOCKS = {"vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
# Options of SemanticStatisticsLoss that FeatureLosses sets itself for its D2SM term.
_SHARED_OPTIONS = (
    "backbone", "layers", "layer_weights", "pretrained", "checkpoint", "mean", "std", "input_range",
    "backbone_kwargs", "backbone_autocast",
)


def vgg_layer_names(architecture: str) -> dict[str, str]:
    """BasicSR's VGG layer names (``conv1_1``, ``relu1_1``, ..., ``pool5``) -> the module names
    of ``features`` in torchvision's and timm's VGG without batch norm (``conv5_4`` of VGG19
    is ``"features.34"``). Empty for any other architecture."""
    names: dict[str, str] = {}
    index = 0
    for block, convs in enumerate(_VGG_BLOCKS.get(architecture.split(".", 1)[0], ()), start=1):
        for conv in range(1, convs + 1):
            for kind in ("conv", "relu"):
                names[f"{kind}{block}_{conv}"] = f"features.{index}"
                index += 1
        names[f"pool{block}"] = f"features.{index}"
        index += 1
    return names


def gram_matrix(features: Tensor) -> Tensor:
    """``(B, C, h, w) -> (B, C, C)``: ``f f^T / (C h w)`` per image, ``f`` its ``C x (h w)`` map."""
    if features.dim() != 4:
        raise ValueError(f"style: Gram matrices need (B, C, h, w) feature maps, got shape {tuple(features.shape)}")
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def feature_distance(x: Tensor, y: Tensor, criterion: str) -> Tensor:
    """Mean ``|x - y|`` (``"l1"``), mean ``(x - y)^2`` (``"l2"``/``"mse"``), the Frobenius
    norm of ``x - y`` over all its entries (``"fro"``) or mean ``sqrt((x - y)^2 + 1e-12)``
    (``"charbonnier"``, traiNNer-redux's)."""
    if criterion == "l1":
        return F.l1_loss(x, y)
    if criterion in ("l2", "mse"):
        return F.mse_loss(x, y)
    if criterion == "fro":
        return torch.linalg.vector_norm(x - y)
    if criterion == "charbonnier":
        return torch.sqrt((x - y) ** 2 + 1e-12).mean()
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


class _SharedMaps(nn.Module):
    """Some of a shared extractor's maps, as a backbone for the D2SM term. While ``share`` is
    set (the D2SM loss takes its private copy of a module backbone at construction), copying
    it gives itself, so that the loss shares the extractor; any later deep copy (of a whole
    :class:`FeatureLosses`) copies the extractor once, as the copy's own."""

    def __init__(self, extractor: FeatureExtractor, indices: list[int]) -> None:
        super().__init__()
        self.extractor, self.indices = extractor, indices
        self.share = False

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedMaps:
        if self.share:
            return self
        copied = _SharedMaps(copy.deepcopy(self.extractor, memo), list(self.indices))
        memo[id(self)] = copied
        return copied

    def forward(self, images: Tensor) -> list[Tensor]:
        maps = self.extractor(images)
        return [maps[i] for i in self.indices]


class FeatureLosses(nn.Module):
    r"""Perceptual, style and D2SM terms from one frozen backbone pass per batch.

    ``forward(restored, clean)`` returns a dict of the weighted terms whose weight is not 0,
    under the keys ``"perceptual"``, ``"style"`` and ``"d2sm"`` (formulas in
    :mod:`d2sm_loss.perceptual`); the training loss is ``pixel + sum(terms.values())`` and the
    dict is ready for logging. ``last_terms`` keeps their detached values.

    Args:
        backbone: a timm model name or an ``nn.Module`` returning feature maps, as for
            :class:`~d2sm_loss.SemanticStatisticsLoss`.
        layer_weights: ``{layer: weight}`` of the perceptual (and by default the style) term.
            Layers as for :class:`~d2sm_loss.SemanticStatisticsLoss` (timm feature indices or
            module names); for VGG (``vgg11/13/16/19``) also BasicSR's names (``"conv5_4"``,
            ``"relu4_4"``...). None: the backbone's default D2SM layer with weight 1.
        perceptual_weight, style_weight, d2sm_weight: the terms' weights (finite, >= 0; a
            term of weight 0 is not computed). At least one must be positive.
        criterion: the distance of the perceptual and style terms, one of :data:`CRITERIA`.
        style_layer_weights: ``{layer: weight}`` of the style term (default: ``layer_weights``).
        d2sm_layer_weights: ``{layer: weight}`` of the D2SM term (default: the backbone's
            default layer, e.g. ``conv5_4`` before its ReLU for VGG19, weight 1).
        pretrained, checkpoint, mean, std, backbone_kwargs, backbone_autocast, input_range:
            as for :class:`~d2sm_loss.SemanticStatisticsLoss`; they apply to every term (the
            D2SM term sees the same normalised images as the others).
        **d2sm_options: the other options of the D2SM term
            (:class:`~d2sm_loss.SemanticStatisticsLoss`: ``queue_size``, ``save_queue``,
            ``granularity`` ``"image"`` or ``"location"``, ``similarity``...). Its state
            (the memory queue) is this module's ``state_dict()`` under ``d2sm.``.

    Cost: the backbone's forward on both batches up to the deepest chosen layer and its
    backward on the restored one, once; then per layer ``O(B C h w)`` for the perceptual term,
    ``O(B C^2 h w)`` for the style term and the D2SM statistic's cost. ``d2sm`` alone (a
    :class:`~d2sm_loss.SemanticStatisticsLoss` sharing the backbone) also works as a loss.
    """

    d2sm: SemanticStatisticsLoss | None
    _extractor: FeatureExtractor

    def __init__(
        self,
        backbone: str | nn.Module = "vgg19",
        layer_weights: Mapping[LayerSpec, float] | None = None,
        *,
        perceptual_weight: float = 1.0,
        style_weight: float = 0.0,
        d2sm_weight: float = 1.0,
        criterion: str = "l1",
        style_layer_weights: Mapping[LayerSpec, float] | None = None,
        d2sm_layer_weights: Mapping[LayerSpec, float] | None = None,
        pretrained: bool = True,
        checkpoint: CheckpointSource | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        backbone_autocast: bool = False,
        backbone_kwargs: Mapping[str, Any] | None = None,
        **d2sm_options: Any,
    ) -> None:
        super().__init__()
        self.perceptual_weight = check_number("perceptual_weight", perceptual_weight, non_negative=True)
        self.style_weight = check_number("style_weight", style_weight, non_negative=True)
        self.d2sm_weight = check_number("d2sm_weight", d2sm_weight, non_negative=True)
        if not (self.perceptual_weight or self.style_weight or self.d2sm_weight):
            raise ValueError("perceptual_weight, style_weight and d2sm_weight are all 0: the loss would be 0")
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        self.input_range = check_range("input_range", input_range)
        self.backbone_autocast = check_bool("backbone_autocast", backbone_autocast)
        shared = sorted(set(d2sm_options) & set(_SHARED_OPTIONS))
        if shared:
            raise TypeError(f"{shared[0]}: not an option of the D2SM term alone; FeatureLosses sets it for all terms")
        if d2sm_options.get("granularity") == "patch":
            raise ValueError(
                "granularity='patch' runs the backbone on crops, which the other terms do not share: "
                "use 'image' or 'location', or SemanticStatisticsLoss alone"
            )
        name = backbone if isinstance(backbone, str) else ""
        architecture = name.split(".", 1)[0]
        default = DEFAULT_LAYERS.get(architecture, [-1])[0] if name else 0
        terms = {
            "perceptual": (self.perceptual_weight, layer_weights, "layer_weights"),
            "style": (self.style_weight, style_layer_weights if style_layer_weights is not None else layer_weights,
                      "style_layer_weights"),
            "d2sm": (self.d2sm_weight, d2sm_layer_weights, "d2sm_layer_weights"),
        }
        layers: list[LayerSpec] = []  # the union, in order of first use
        self._layers: dict[str, list[tuple[int, float]]] = {}
        for term, (weight, mapping, argument) in terms.items():
            if not weight:
                continue
            mapping = {default: 1.0} if mapping is None else mapping
            for spec, layer_weight in _layer_mapping(argument, mapping, vgg_layer_names(architecture)).items():
                if spec not in layers:
                    layers.append(spec)
                self._layers.setdefault(term, []).append((layers.index(spec), layer_weight))
        self.__dict__["_extractor"] = FeatureExtractor(
            backbone, layers, pretrained=pretrained, checkpoint=checkpoint, mean=mean, std=std,
            backbone_kwargs=backbone_kwargs,
        )
        self.d2sm = None
        if self.d2sm_weight:
            view = _SharedMaps(self._extractor, [index for index, _ in self._layers["d2sm"]])
            view.share = True
            try:
                self.d2sm = SemanticStatisticsLoss(
                    view, None, [w for _, w in self._layers["d2sm"]],
                    pretrained=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_range=self.input_range,
                    backbone_autocast=self.backbone_autocast, **d2sm_options,
                )
            finally:
                view.share = False
        self.last_terms: dict[str, Tensor] = {}

    @property
    def backbone(self) -> nn.Module:
        """The frozen feature backbone (shared by the terms; not a registered submodule)."""
        return self._extractor.model

    @property
    def weights_source(self) -> str | None:
        """Where the backbone's weights came from (a file, a cache, a download), if known."""
        return getattr(self._extractor, "weights_source", None)

    @property
    def layers(self) -> list[LayerSpec]:
        """Every layer the terms use (their union), as module names of the backbone."""
        return list(self._extractor.layers or [])

    def term_layers(self, term: str) -> dict[str, float]:
        """``{layer: weight}`` of one term (``"perceptual"``, ``"style"`` or ``"d2sm"``)."""
        names = [str(layer) for layer in self.layers]
        return {names[index]: weight for index, weight in self._layers.get(term, [])}

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.d2sm is None:  # else the D2SM term moves the shared extractor
            self._extractor._apply(fn)
        return self

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """The backbone's maps of every chosen layer (:attr:`layers`) for ``images`` in
        ``input_range``; under :func:`torch.autocast` the backbone runs in float32 unless
        ``backbone_autocast=True``."""
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(self._extractor.mean.dtype)
        low, high = self.input_range
        if (low, high) != (0.0, 1.0):
            images = (images - low) / (high - low)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        device_type = images.device.type
        if self.backbone_autocast or not torch.is_autocast_enabled(device_type):
            return self._extractor(images)
        with torch.autocast(device_type, enabled=False):
            return self._extractor(images.to(self._extractor.mean.dtype))

    def forward(self, restored: Tensor, clean: Tensor) -> dict[str, Tensor]:
        """The weighted terms between ``restored`` (receives the gradient) and ``clean``."""
        check_images("restored", restored)
        check_images("clean", clean)
        check_pair(restored, clean)
        if restored.device != self._extractor.device():
            raise ValueError(
                f"the images are on {restored.device} but the loss's backbone is on {self._extractor.device()}: "
                "move the loss with criterion.to(device)"
            )
        check_image_size(restored.shape[-2:], self._extractor, patch_size=None, layers=self.layers)
        x_maps = self.feature_maps(restored)
        with torch.no_grad():
            y_maps = self.feature_maps(clean)
        terms: dict[str, Tensor] = {}
        if self.perceptual_weight:
            terms["perceptual"] = self.perceptual_weight * sum(
                (w * feature_distance(x_maps[i], y_maps[i], self.criterion) for i, w in self._layers["perceptual"]),
                start=restored.new_zeros((), dtype=x_maps[0].dtype),
            )
        if self.style_weight:
            terms["style"] = self.style_weight * sum(
                (w * feature_distance(gram_matrix(x_maps[i]), gram_matrix(y_maps[i]), self.criterion)
                 for i, w in self._layers["style"]),
                start=restored.new_zeros((), dtype=x_maps[0].dtype),
            )
        if self.d2sm is not None:
            indices = [i for i, _ in self._layers["d2sm"]]
            maps = ([x_maps[i] for i in indices], [y_maps[i] for i in indices])
            terms["d2sm"] = self.d2sm_weight * self.d2sm(restored, clean, maps=maps)
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return terms

    def extra_repr(self) -> str:
        weights = f"perceptual_weight={self.perceptual_weight}, style_weight={self.style_weight}, "
        return (
            f"backbone={self._extractor.name!r}, layers={self.layers}, {weights}d2sm_weight={self.d2sm_weight}, "
            f"criterion={self.criterion!r}"
        )


def _layer_mapping(argument: str, mapping: Any, vgg_names: Mapping[str, str]) -> dict[LayerSpec, float]:
    """``{layer: weight}`` checked: a non-empty mapping of layer specs (VGG names translated)
    to finite non-negative weights, not all 0."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{argument} must be a mapping {{layer: weight}}, got {type(mapping).__name__} {mapping!r}")
    if not mapping:
        raise ValueError(f"{argument} must map at least one layer to its weight, got an empty mapping")
    checked: dict[LayerSpec, float] = {}
    for spec, weight in mapping.items():
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise TypeError(f"{argument}: layers are ints (feature indices) or strs (module names), got {spec!r}")
        layer = vgg_names.get(spec, spec) if isinstance(spec, str) else spec
        if layer in checked:
            raise ValueError(f"{argument}: layer {spec!r} is given twice ({layer!r})")
        checked[layer] = check_number(f"{argument}[{spec!r}]", weight, non_negative=True)
    if not any(checked.values()):
        raise ValueError(f"{argument} are all 0, which makes the term identically 0: got {dict(mapping)}")
    return checked

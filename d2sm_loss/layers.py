"""Layer specs: which feature maps of a backbone the loss uses.

A layer is a feature index (``int``: timm's ``features_only`` taps, negative from the end)
or a module / graph-node name (``str``). These helpers check specs, resolve indices to taps,
and refuse a layer chosen twice; :class:`~d2sm_loss.features.FeatureExtractor` plans its
layers with them.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "DEFAULT_LAYERS",
    "LayerPlan",
    "LayerSpec",
    "checked_layers",
    "default_layers",
    "describe_taps",
    "node_for",
    "reject_duplicate_layers",
    "tap_index",
]

#: One layer, by feature index or by module / graph-node name.
LayerSpec = Union[int, str]

#: Default layers of timm models (by architecture name, without a pretrained tag) whose
#: deepest feature tap is a poor default. VGG's deepest tap is its last max-pool, after a
#: ReLU: every feature is >= 0, so every cosine similarity is >= 0 and the similarity
#: distributions are flattened. The default is the last convolution before its ReLU
#: (conv5_4 of VGG19, conv5_3 of VGG16), the layer of the D2SM paper, where cosines span
#: [-1, 1]. Any other backbone defaults to its deepest feature tap.
DEFAULT_LAYERS: dict[str, list[LayerSpec]] = {"vgg19": ["features.34"], "vgg16": ["features.28"]}

def describe_taps(feature_info: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(
        f"{i}: {info['module']} ({info['num_chs']} ch, /{info['reduction']})" for i, info in enumerate(feature_info)
    )


def tap_index(layer: int, taps: Sequence[Mapping[str, Any]], model_name: str) -> int:
    """Feature index ``layer`` (negative counts from the end) as a position in ``taps``."""
    index = layer + len(taps) if layer < 0 else layer
    if not 0 <= index < len(taps):
        raise ValueError(
            f"layers: feature index {layer} is out of range for {model_name!r}, which has "
            f"{len(taps)} taps: {describe_taps(taps)}"
        )
    return index


def _checked_layer(layer: Any) -> LayerSpec:
    """One layer spec as an int or a str; integer scalars (numpy, 0-d tensors) become ints."""
    if isinstance(layer, str):
        return layer
    if not isinstance(layer, bool) and hasattr(layer, "__index__"):
        try:
            return operator.index(layer)
        except TypeError:
            pass
    raise TypeError(f"layers must hold ints (feature indices) or strs (module names), got {layer!r}")


def checked_layers(layers: Sequence[LayerSpec] | LayerSpec | None) -> list[LayerSpec] | None:
    """``layers`` as a list of ints and strs (None stays None); no layer given twice."""
    if layers is None:
        return None
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        if isinstance(layers, (str, int)) or hasattr(layers, "__index__"):
            return [_checked_layer(layers)]
        raise TypeError(f"layers must be an int, a str or a sequence of them, got {type(layers).__name__} {layers!r}")
    checked = [_checked_layer(layer) for layer in layers]
    if not checked:
        raise ValueError("layers must name at least one layer, got an empty sequence")
    reject_duplicate_layers(checked, checked, "the backbone")
    return checked


def reject_duplicate_layers(specs: Sequence[LayerSpec], targets: Sequence[Any], model_name: str) -> None:
    """Raise if two of ``specs`` choose the same layer (``targets[i]`` is what ``specs[i]`` resolves to)."""
    first: dict[Any, LayerSpec] = {}
    for spec, target in zip(specs, targets):
        if target not in first:
            first[target] = spec
            continue
        earlier = first[target]
        if type(earlier) is type(spec) and earlier == spec:
            raise ValueError(f"layers: {spec!r} is given twice; choose each layer once")
        raise ValueError(
            f"layers: {earlier!r} and {spec!r} are the same layer of {model_name} ({target!r}); choose each layer once"
        )


@dataclass(frozen=True)
class LayerPlan:
    """The chosen layers of a timm model: feature taps (``indices``, built with
    ``features_only``) or graph nodes (``indices`` None, traced), with their names and
    downsampling factors."""

    indices: list[int] | None
    names: list[str]
    reductions: list[int | None]


def default_layers(model_name: str, taps: Sequence[Mapping[str, Any]]) -> list[LayerSpec]:
    """The layers used when ``layers=None``: :data:`DEFAULT_LAYERS` for the architectures
    listed there, else the deepest feature tap."""
    architecture = model_name.split(".", 1)[0]
    if architecture in DEFAULT_LAYERS:
        return list(DEFAULT_LAYERS[architecture])
    if not taps:
        raise ValueError(f"layers: backbone {model_name!r} has no feature taps; choose layers by module name")
    return [len(taps) - 1]


def node_for(layer: str, nodes: list[str], model_name: str) -> str:
    """The graph node whose output is ``layer``'s: the node itself, or for a container
    module (``"layer1"``, traced through) the last node inside it."""
    if layer in nodes:
        return layer
    inside = [node for node in nodes if node.startswith(layer + ".")]
    if inside:
        return inside[-1]
    close = difflib.get_close_matches(layer, nodes, n=5)
    raise ValueError(f"layers: {layer!r} is not a module or node of {model_name!r}; close matches: {close}")

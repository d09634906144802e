"""Rows: the samples the statistic compares, made from images and feature maps.

:func:`image_crops` cuts images into the crops of ``"patch"`` granularity;
:func:`feature_rows` turns a feature map into rows (one vector per image or crop, or one
per location); :class:`LayerRows` carries one layer's rows from
:meth:`~d2sm_loss.SemanticStatisticsLoss.rows` to
:meth:`~d2sm_loss.SemanticStatisticsLoss.statistic`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ._warnings import warn_user
from .checks import InputSizeError

if TYPE_CHECKING:
    from .queue import FeatureQueue

__all__ = [
    "LayerRows",
    "MIN_LOCATIONS",
    "check_group_rows",
    "check_layer_rows",
    "check_locations",
    "check_pool_locations",
    "feature_rows",
    "few_locations_message",
    "image_crops",
    "min_rows",
    "pair_without_self_message",
    "single_row_message",
]

#: At location granularity, a feature map with fewer locations than this gives a warning:
#: with a handful of samples the statistic is nearly constant and its gradient tiny.
MIN_LOCATIONS = 16


def image_crops(images: Tensor, size: int, stride: int) -> Tensor:
    """``(B, C, H, W)`` images as ``(B * nh * nw, C, size, size)`` crops taken every
    ``stride`` pixels, image by image in row-major order (a view-based ``unfold``, then
    one copy)."""
    channels = images.shape[1]
    crops = images.unfold(2, size, stride).unfold(3, size, stride)  # B, C, nh, nw, size, size
    return crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels, size, size)


def feature_rows(features: Tensor, granularity: str, pool_size: tuple[int, int] | None = None) -> Tensor:
    """The rows of a feature map: ``(B, D)`` (``D = C h w``, the flattened map) at
    ``"image"`` and ``"patch"`` granularity, ``(B, L, C)`` (``L = h w`` locations) at
    ``"location"`` granularity. ``pool_size`` adaptive-average-pools the map to that grid
    first (needs a ``(B, C, h, w)`` map). A map that is not 4-d (transformer tokens of a
    user module, ``(B, L, C)``) is used as it is at location granularity."""
    if pool_size is not None:
        if features.dim() != 4:
            raise ValueError(
                f"pool_size needs (B, C, h, w) feature maps, but the backbone returned shape "
                f"{tuple(features.shape)}; set pool_size=None"
            )
        features = F.adaptive_avg_pool2d(features, pool_size)
    if granularity == "location":
        return features.flatten(2).transpose(1, 2) if features.dim() == 4 else features
    return features.flatten(1)


def single_row_message(granularity: str, layer: str | None) -> str:
    """Why a group of one row has nothing to compare: the error of a training call
    (``layer`` given), or the warning of a call that does not train (``layer=None``, 0)."""
    if granularity == "location":
        return (
            f"granularity='location': the feature map of layer {layer!r} has a single location, so there "
            "is nothing to compare. Use larger images, a shallower layer, or pool_size of at least 2."
        )
    what = "image" if granularity == "image" else "crop"
    if layer is None:
        return (
            f"SemanticStatisticsLoss: a call that does not train (eval() or no_grad) compares the {what}s of "
            f"its own batch; this one has a single {what}: nothing to compare, the loss is 0. "
            "Use batches of 2 or more. (Warned once.)"
        )
    return (
        f"granularity={granularity!r} compares the {what}s of a batch with each other, but this training "
        f"call has a single {what} ({'a batch of one' if what == 'image' else 'one crop in the batch'}, "
        "queue_size=0): nothing to compare. Use a larger batch, queue_size > 0 or 'location' granularity."
    )


def few_locations_message(layer: str, count: int, image_size: Sequence[int], minimum: int) -> str:
    """The once-per-layer warning for a location-granularity map of fewer than ``minimum``
    locations."""
    return (
        f"SemanticStatisticsLoss: layer {layer!r} has only {count} locations on {image_size[0]}x{image_size[1]} "
        f"images (< {minimum}), so the statistic barely moves. Use larger images, a shallower layer, or "
        "granularity='image' with queue_size > 0. (Warned once per layer.)"
    )


def pair_without_self_message(granularity: str, layer: str, count: int, has_queue: bool) -> str:
    """Why ``include_self=False`` with two samples per group is refused: each sample's
    distribution is the other sample with probability 1, so the loss is identically 0."""
    samples = {"image": "images", "patch": "crops", "location": "locations"}[granularity]
    if granularity == "location":
        remedy = "3 locations (larger images or a shallower layer)."
    else:
        remedy = f"3 {samples} per call (a larger batch{'' if has_queue else ' or queue_size > 0'})."
    return (
        f"include_self=False: layer {layer!r} has {count} {samples} per group, so each one's distribution "
        "holds the one other sample with probability 1 and the loss is identically 0, with no gradient. "
        f"Use include_self=True, or at least {remedy}"
    )


def min_rows(include_self: bool) -> int:
    """The fewest rows a group needs for the statistic to say anything: 2, or 3 without the
    diagonal (``include_self=False``), where with two rows each row's distribution is the
    other row with probability 1, so the statistic is identically 0 with no gradient."""
    return 2 if include_self else 3


def _group_rows_message(count: int) -> str:
    return (
        f"include_self=False needs at least {min_rows(False)} rows per group, got N={count}: without the diagonal, "
        + ("a single row has nothing to compare" if count < 2 else
           "each row's distribution holds the one other row with probability 1, so the statistic is "
           "identically 0 and has no gradient")
        + "; use include_self=True or more rows per group"
    )


def check_group_rows(count: int, include_self: bool) -> None:
    """:func:`~d2sm_loss.functional.similarity_kl`'s rule: groups of ``count`` rows without
    the diagonal need :func:`min_rows` rows (a ``ValueError``). With the diagonal a group of
    one row is computed (its statistic is 0)."""
    if not include_self and count < min_rows(include_self):
        raise ValueError(_group_rows_message(count))


def _warn_once(warned: set[str], key: str, message: str) -> None:
    if key not in warned and not torch.compiler.is_compiling():
        warned.add(key)
        warn_user(message)


def check_layer_rows(
    rows: LayerRows, *, granularity: str, include_self: bool, trains: bool, queue_size: int, warned: set[str]
) -> bool:
    """The module's rule for one layer's group: its rows, and the queue's when one is
    attached, must reach :func:`min_rows`.

    Two rows without the diagonal raise an :class:`~d2sm_loss.checks.InputSizeError` (the
    loss would be identically 0); a single row raises in a training call or at location
    granularity, and otherwise (a call that does not train) is warned about once (``warned``
    holds the warnings given) and returns False: the statistic is 0. True when the
    statistic can be computed. ``queue_size`` (the module's) only words the remedy.
    """
    count = rows.restored.shape[-2] + (rows.queue.size if rows.queue is not None else 0)
    if count >= min_rows(include_self):
        return True
    remedy = "image" if granularity == "location" else "batch"
    if count == 2:  # only without the diagonal
        raise InputSizeError(pair_without_self_message(granularity, rows.layer, 2, queue_size > 0), remedy=remedy)
    if trains or granularity == "location":
        raise InputSizeError(single_row_message(granularity, rows.layer), remedy=remedy)
    _warn_once(warned, "single row", single_row_message(granularity, None))
    return False


def check_pool_locations(pool_size: tuple[int, int], include_self: bool) -> None:
    """At location granularity, ``pool_size`` fixes the locations per image: at least
    :func:`min_rows` of them, checked at construction."""
    locations, minimum = pool_size[0] * pool_size[1], min_rows(include_self)
    if locations < minimum:
        raise ValueError(
            f"pool_size={pool_size} leaves {locations} location(s) per image at granularity='location'"
            + (", and without the diagonal (include_self=False) two locations give a loss that is "
               "identically 0" if locations == 2 else ": nothing to compare")
            + f"; use a pool_size of at least {minimum} locations or granularity='image'"
        )


def check_locations(
    layer: str, count: int, image_size: Sequence[int], include_self: bool, warned: set[str]
) -> None:
    """Warn once per layer when a location-granularity map has enough locations to compute
    (:func:`min_rows`) but fewer than :data:`MIN_LOCATIONS`; fewer than :func:`min_rows` is
    :func:`check_layer_rows`'s error."""
    if min_rows(include_self) <= count < MIN_LOCATIONS:
        _warn_once(warned, f"locations {layer}", few_locations_message(layer, count, image_size, MIN_LOCATIONS))


@dataclass
class LayerRows:
    """The samples of one layer, ready for the statistic (see :meth:`~d2sm_loss.SemanticStatisticsLoss.rows`).

    Attributes:
        layer: the layer's name (or index, for a user module with ``layers=None``).
        weight: its layer weight.
        restored: the restored rows: ``(B, D)`` at image and patch granularity (this call's
            rows, gathered over ranks under torch.distributed in a training call), or
            ``(B, L, C)`` at location granularity (one group of ``L`` locations per image).
            Attached to the autograd graph of the restored images.
        clean: the clean rows, same shape, without a graph.
        batch_rows: how many rows come from this call (``restored.shape[0]``).
        queue: the memory queue whose rows join this call's in the statistic (a training
            call with ``queue_size > 0``), else None.
    """

    layer: str
    weight: float
    restored: Tensor
    clean: Tensor
    batch_rows: int
    queue: FeatureQueue | None = None

    def all_rows(self) -> tuple[Tensor, Tensor]:
        """This call's rows followed by the queue's filled rows, in their promoted dtype:
        the rows the statistic compares, for the full computation
        (:func:`~d2sm_loss.functional.similarity_kl`). Reads the queue's fill count (a
        device synchronisation)."""
        if self.queue is None or self.queue.count == 0:
            return self.restored, self.clean
        past_x, past_y = self.queue.rows()
        dtype = torch.promote_types(self.restored.dtype, past_x.dtype)
        x = torch.cat([self.restored.to(dtype), past_x.to(self.restored.device, dtype)])
        y = torch.cat([self.clean.to(dtype), past_y.to(self.clean.device, dtype)])
        return x, y

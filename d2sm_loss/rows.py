"""The rows of one layer, handed from :meth:`~d2sm_loss.SemanticStatisticsLoss.rows` to
:meth:`SemanticStatisticsLoss.statistic`: :class:`LayerRows`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["LayerRows"]


@dataclass
class LayerRows:
    """The samples of one layer, ready for the statistic (see :meth:`~d2sm_loss.SemanticStatisticsLoss.rows`).

    Attributes:
        layer: the layer's name (or index, for a user module with ``layers=None``).
        weight: its layer weight.
        restored: the restored rows: ``(N, D)`` at image and patch granularity (this call's
            rows, gathered over ranks under torch.distributed, followed by the queue's), or
            ``(B, L, C)`` at location granularity (one group of ``L`` locations per image).
            Attached to the autograd graph of the restored images.
        clean: the clean rows, same shape, without a graph.
        batch_rows: how many leading rows come from this call (the rest from the queue).
    """

    layer: str
    weight: float
    restored: Tensor
    clean: Tensor
    batch_rows: int

"""The D2SM loss with traiNNer-redux's loss conventions, in a module that does not import
traiNNer.

traiNNer-redux builds a loss from a config entry ``{type: NAME, loss_weight: W, **options}``
by looking the lower-cased ``NAME`` up in its ``LOSS_REGISTRY`` and calling
``cls(loss_weight=W, **options)``. Unlike BasicSR, its model multiplies what a loss returns
by ``abs(loss.loss_weight)`` itself (a negative weight makes it compare the output with the
upscaled low-resolution input instead of the ground truth), and it calls the losses inside
its autocast region (``use_amp``): the backbone then still runs in float32 unless
``backbone_autocast=True`` (see :class:`~d2sm_loss.SemanticStatisticsLoss`).
"""

from __future__ import annotations

from typing import Any

from ..checks import check_number
from ..loss import SemanticStatisticsLoss

__all__ = ["D2SMLoss"]


class D2SMLoss(SemanticStatisticsLoss):
    """The D2SM loss for traiNNer-redux (``type: d2smloss``); stores ``loss_weight`` for the
    model, which applies it, and returns the unweighted loss.

    Args:
        loss_weight: the weight the model multiplies the loss by (a finite number).
        **options: the arguments of :class:`~d2sm_loss.SemanticStatisticsLoss`.
    """

    def __init__(self, loss_weight: float, **options: Any) -> None:
        super().__init__(**options)
        self.loss_weight = check_number("loss_weight", loss_weight)

"""The D2SM loss in traiNNer-redux: importing this module registers it.

traiNNer-redux imports the ``*_loss.py`` files of its ``traiNNer/losses/`` folder; a file
``traiNNer/losses/d2sm_loss.py`` holding the one line ::

    import d2sm_loss.integrations.trainner  # noqa: F401

registers :class:`~d2sm_loss.integrations.trainner_losses.D2SMLoss` under ``d2smloss``, the
lower-case name its configs use::

    losses:
      - type: d2smloss
        loss_weight: 0.1
        backbone: vgg19
        queue_size: 64

traiNNer-redux saves no loss state: the memory queue starts empty after a resume and refills
in ``ceil(queue_size / global batch)`` iterations.
"""

from __future__ import annotations

from .trainner_losses import D2SMLoss

__all__ = ["D2SMLoss", "register"]

try:
    from traiNNer.utils.registry import LOSS_REGISTRY
except ModuleNotFoundError as error:
    if error.name not in ("traiNNer", "traiNNer.utils", "traiNNer.utils.registry"):
        raise
    raise ImportError(
        "d2sm_loss.integrations.trainner needs traiNNer-redux, which is not on PyPI: run from a checkout of "
        "https://github.com/the-database/traiNNer-redux (its train.py's folder), with its requirements installed"
    ) from error


def register() -> None:
    """Register the loss as ``d2smloss`` (done on import; repeat calls do nothing)."""
    name = D2SMLoss.__name__.lower()
    if name not in LOSS_REGISTRY:
        LOSS_REGISTRY.register(D2SMLoss)
    elif LOSS_REGISTRY.get(name) is not D2SMLoss:
        raise RuntimeError(
            f"traiNNer's loss registry already holds another {name!r}: remove the other file that registers it"
        )


register()

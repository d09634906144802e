"""The D2SM loss in traiNNer-redux: importing this module registers it.

traiNNer-redux imports the ``*_loss.py`` files of its ``traiNNer/losses/`` folder; a file
``traiNNer/losses/d2sm_loss.py`` holding the one line ::

    import d2sm_loss.integrations.trainner  # noqa: F401

registers :class:`~d2sm_loss.integrations.trainner_losses.D2SMLoss` under ``d2smloss`` and
:class:`~d2sm_loss.integrations.trainner_losses.PerceptualD2SMLoss` under
``perceptuald2smloss``, the lower-case names its configs use::

    losses:
      - type: perceptuald2smloss   # was: perceptualloss (plus a second entry for D2SM)
        loss_weight: 0.03
        criterion: charbonnier
        d2sm_weight: 3.0           # D2SM = 0.03 * 3.0 * D2SM(output, gt)
        queue_size: 64
        save_queue: true

The queue survives redux's resume: redux has no model registry to add a model to, so the
import also extends its ``BaseModel.save_training_state`` and ``BaseModel.resume_training``
(once, in this process) to write the D2SM losses' state beside each training state
(``training_states/ITER.d2sm.pth``, on rank 0, for losses with ``save_queue: true``) and to
load it on ``--auto_resume``. Without ``save_queue`` nothing is written, and the queue
refills in ``ceil(queue_size / global batch)`` iterations after a resume.
"""

from __future__ import annotations

from .._warnings import warn_user
from .trainner_losses import D2SMLoss, PerceptualD2SMLoss, keep_loss_states

__all__ = ["D2SMLoss", "PerceptualD2SMLoss", "keep_loss_states", "register"]

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
    """Register the losses as ``d2smloss`` and ``perceptuald2smloss`` (done on import; repeat
    calls do nothing)."""
    for loss in (D2SMLoss, PerceptualD2SMLoss):
        name = loss.__name__.lower()
        if name not in LOSS_REGISTRY:
            LOSS_REGISTRY.register(loss)
        elif LOSS_REGISTRY.get(name) is not loss:
            raise RuntimeError(
                f"traiNNer's loss registry already holds another {name!r}: remove the other file that registers it"
            )


register()
try:
    from traiNNer.models.base_model import BaseModel
except ImportError as error:  # the losses work; their state is not saved
    warn_user(
        f"d2sm_loss.integrations.trainner: traiNNer.models.base_model does not import ({error}); the D2SM "
        "losses' memory queue is not saved with redux's training states"
    )
else:
    keep_loss_states(BaseModel)

"""The D2SM loss in BasicSR: importing this module registers it.

Importing ``d2sm_loss.integrations.basicsr`` registers, in the installed BasicSR:

- ``D2SMLoss`` (``pixel_opt`` slot, weighted by ``loss_weight``) and ``D2SMPerceptualLoss``
  (``perceptual_opt`` slot, weighted by ``perceptual_weight``, returns ``(percep, None)``)
  in ``LOSS_REGISTRY``; see :mod:`d2sm_loss.integrations.basicsr_losses`;
- ``D2SMSRModel`` in ``MODEL_REGISTRY``: BasicSR's ``SRModel`` that also saves the D2SM
  losses' state beside each training state (``training_states/ITER.d2sm.pth``) and loads
  it on resume, so that a loss built with ``save_queue=True`` resumes with its memory queue.
  BasicSR itself saves networks, optimizers and schedulers only: with ``SRModel`` the queue
  starts empty after a resume and refills in ``ceil(queue_size / global batch)`` iterations.

Running it trains with BasicSR's own pipeline, the loss registered, from the current
directory (experiments go to ``./experiments/NAME``, as with BasicSR's ``basicsr/train.py``)::

    python -m d2sm_loss.integrations.basicsr -opt options/train.yml [--auto_resume]

BasicSR 1.4.2 as published (``pip install basicsr``) fails to import with torchvision 0.17
or newer; ``pip install basicsr-fixed`` is the same code with that import fixed (the module
is still ``basicsr``).
"""

from __future__ import annotations

import os
from typing import Any

from ..checkpoints import CheckpointError, load_state_dicts, save_state_dicts
from ..loss import SemanticStatisticsLoss
from ..queue import FeatureQueue
from .basicsr_losses import D2SMLoss, D2SMPerceptualLoss

__all__ = ["D2SMLoss", "D2SMPerceptualLoss", "D2SMSRModel", "main", "register"]


def _import_basicsr() -> None:
    try:
        import basicsr  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name == "basicsr":
            raise ImportError(
                "d2sm_loss.integrations.basicsr needs BasicSR: pip install basicsr-fixed (BasicSR 1.4.2 with its "
                "import fixed for current torchvision; the module is still `basicsr`)"
            ) from error
        raise ImportError(
            f"BasicSR is installed but `import basicsr` fails: {error}. The `basicsr` release on PyPI imports "
            "torchvision.transforms.functional_tensor, which torchvision 0.17 removed: "
            "pip uninstall basicsr && pip install basicsr-fixed"
        ) from error


_import_basicsr()

from basicsr.models.sr_model import SRModel  # noqa: E402
from basicsr.utils import get_root_logger  # noqa: E402
from basicsr.utils.dist_util import master_only  # noqa: E402
from basicsr.utils.registry import LOSS_REGISTRY, MODEL_REGISTRY  # noqa: E402


class D2SMSRModel(SRModel):
    """BasicSR's ``SRModel`` that keeps the D2SM losses' state across a resume.

    Beside each training state ``training_states/ITER.state`` it writes
    ``ITER.d2sm.pth``: the ``state_dict()`` of every D2SM loss of the model (with
    ``save_queue=True`` it holds the memory queue: ``queue_size`` rows of two feature
    vectors per layer, 4 bytes a feature), written atomically (a temporary file renamed).
    On resume the file of the resumed iteration is loaded if it exists; one that is empty,
    truncated, foreign or does not fit the losses is a :class:`~d2sm_loss.checkpoints.CheckpointError`
    naming the file and what to do.
    """

    def _d2sm_losses(self) -> dict[str, SemanticStatisticsLoss]:
        found = {name: getattr(self, name, None) for name in ("cri_pix", "cri_perceptual")}
        return {name: loss for name, loss in found.items() if isinstance(loss, SemanticStatisticsLoss)}

    def _d2sm_state_path(self, current_iter: int) -> str:
        return os.path.join(self.opt["path"]["training_states"], f"{current_iter}.d2sm.pth")

    @master_only
    def save_training_state(self, epoch: int, current_iter: int) -> None:
        super().save_training_state(epoch, current_iter)
        losses = self._d2sm_losses()
        if current_iter != -1 and losses:
            states = {name: loss.state_dict() for name, loss in losses.items()}
            save_state_dicts(states, self._d2sm_state_path(current_iter))

    def resume_training(self, resume_state: dict[str, Any]) -> None:
        super().resume_training(resume_state)
        path = self._d2sm_state_path(resume_state["iter"])
        losses = self._d2sm_losses()
        if losses and os.path.exists(path):
            remedy = (
                f"Delete {path} to resume without the D2SM loss state (the memory queue then refills in "
                "ceil(queue_size / global batch) iterations), or resume from another iteration"
            )
            state = load_state_dicts(path, remedy=remedy)
            if not any(name in state for name in losses):
                raise CheckpointError(f"checkpoint: {path!r} holds no state of {sorted(losses)}. {remedy}")
            for name, loss in losses.items():
                if name in state:
                    try:
                        loss.load_state_dict(state[name])
                    except (RuntimeError, ValueError) as error:
                        raise CheckpointError(
                            f"checkpoint: {path!r}: the state of {name} does not fit this loss "
                            f"({str(error).strip().splitlines()[-1].strip()}). {remedy}"
                        ) from None
                    queues = [queue for queue in loss.queues or [] if isinstance(queue, FeatureQueue)]
                    rows = queues[0].count if queues else 0  # every layer's queue holds as many rows
                    message = f"D2SM loss state of {name} restored from {path} (memory queue: {rows} rows)"
                    get_root_logger().info(message)


def _register_one(registry: Any, obj: type) -> None:
    if obj.__name__ not in registry:
        registry.register(obj)
    elif registry.get(obj.__name__) is not obj:
        raise RuntimeError(
            f"BasicSR's {registry._name} registry already holds another {obj.__name__!r}: "
            "remove the other registration (e.g. a copied file in basicsr/losses or basicsr/models)"
        )


def register() -> None:
    """Register the D2SM losses and ``D2SMSRModel`` in BasicSR (done on import; repeat
    calls do nothing)."""
    for loss in (D2SMLoss, D2SMPerceptualLoss):
        _register_one(LOSS_REGISTRY, loss)
    _register_one(MODEL_REGISTRY, D2SMSRModel)


def main() -> None:
    """BasicSR's ``train_pipeline`` with the loss registered, rooted at the current
    directory; the command line is BasicSR's (``-opt``, ``--auto_resume``, ``--launcher``...)."""
    from basicsr.train import train_pipeline

    register()
    train_pipeline(os.getcwd())


if __name__ == "__main__":
    # Run under the module's own name, so that its classes are registered once whoever imports it.
    from d2sm_loss.integrations.basicsr import main as _main

    _main()
else:
    register()

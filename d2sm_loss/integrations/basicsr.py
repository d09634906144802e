"""The D2SM loss in BasicSR: importing this module registers it.

Importing ``d2sm_loss.integrations.basicsr`` registers, in the installed BasicSR:

- ``D2SMLoss`` (``pixel_opt`` slot, weighted by ``loss_weight``), ``D2SMPerceptualLoss``
  (``perceptual_opt`` slot, weighted by ``perceptual_weight``, returns ``(percep, None)``) and
  ``PerceptualD2SMLoss`` (``perceptual_opt`` slot: BasicSR's ``PerceptualLoss`` arguments plus
  ``d2sm_weight``, perceptual, style and D2SM from one VGG pass) in ``LOSS_REGISTRY``; see
  :mod:`d2sm_loss.integrations.basicsr_losses`;
- ``D2SMSRModel`` in ``MODEL_REGISTRY``: BasicSR's ``SRModel`` that also saves the D2SM
  losses' state (whichever slot holds them) beside each training state
  (``training_states/ITER.d2sm.pth``) and loads it on resume, so that a loss built with
  ``save_queue=True`` resumes with its memory queue, and logs the D2SM term of a
  ``PerceptualD2SMLoss`` apart (``l_d2sm``; it is also inside ``l_percep``). BasicSR itself
  saves networks, optimizers and schedulers only: with ``SRModel`` the queue starts empty
  after a resume and refills in ``ceil(queue_size / global batch)`` iterations.

Running it trains with BasicSR's own pipeline, the loss registered, from the current
directory (experiments go to ``./experiments/NAME``, as with BasicSR's ``basicsr/train.py``)::

    python -m d2sm_loss.integrations.basicsr -opt options/train.yml [--auto_resume]

On a machine without CUDA this entry point also resumes (``--auto_resume`` or
``path: resume_state``): BasicSR 1.4.2's ``load_resume_state`` calls
``torch.cuda.current_device()``, so the entry point loads the training state itself, onto the
CPU, by the same rules (the latest ``ITER.state`` of ``experiments/NAME/training_states``, or
``resume_state``). With CUDA, BasicSR's own function runs.

BasicSR 1.4.2 as published (``pip install basicsr``) fails to import with torchvision 0.17
or newer; ``pip install basicsr-fixed`` is the same code with that import fixed (the module
is still ``basicsr``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..loss import SemanticStatisticsLoss
from ..perceptual import FeatureLosses
from ..weights import CheckpointError, load_state_dicts, save_state_dicts
from .basicsr_losses import D2SMLoss, D2SMPerceptualLoss, PerceptualD2SMLoss

__all__ = [
    "D2SMLoss", "D2SMPerceptualLoss", "D2SMSRModel", "PerceptualD2SMLoss", "load_resume_state", "main", "register",
]


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

import basicsr.train  # noqa: E402
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
    truncated, foreign or does not fit the losses is a :class:`~d2sm_loss.weights.CheckpointError`
    naming the file and what to do.
    """

    def _d2sm_losses(self) -> dict[str, nn.Module]:
        """The model's D2SM losses by attribute: every ``cri_*`` slot (``cri_pix``,
        ``cri_perceptual``...) that holds one."""
        found = {name: value for name, value in vars(self).items() if name.startswith("cri_")}
        return {name: loss for name, loss in found.items() if isinstance(loss, (SemanticStatisticsLoss, FeatureLosses))}

    def optimize_parameters(self, current_iter: int) -> None:
        super().optimize_parameters(current_iter)
        terms = getattr(getattr(self, "cri_perceptual", None), "last_terms", None)
        if isinstance(terms, dict) and "d2sm" in terms:
            self.log_dict["l_d2sm"] = float(terms["d2sm"])  # this rank's value; also inside l_percep

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
                    d2sm = loss.d2sm if isinstance(loss, FeatureLosses) else loss
                    queues = d2sm._queue_list() if isinstance(d2sm, SemanticStatisticsLoss) else []
                    rows = queues[0].count if queues else 0  # every layer's queue holds as many rows
                    message = f"D2SM loss state of {name} restored from {path} (memory queue: {rows} rows)"
                    get_root_logger().info(message)


_BASICSR_LOAD_RESUME_STATE = basicsr.train.load_resume_state


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
    for loss in (D2SMLoss, D2SMPerceptualLoss, PerceptualD2SMLoss):
        _register_one(LOSS_REGISTRY, loss)
    _register_one(MODEL_REGISTRY, D2SMSRModel)


def load_resume_state(opt: dict[str, Any]) -> dict[str, Any] | None:
    """BasicSR's ``basicsr.train.load_resume_state`` that also works without CUDA: the training
    state to resume from (the latest ``experiments/NAME/training_states/ITER.state`` with
    ``auto_resume``, else ``path: resume_state``), loaded onto the current CUDA device when
    there is one (BasicSR's own function) and onto the CPU otherwise; None when there is none."""
    from basicsr.utils import check_resume, scandir

    if torch.cuda.is_available():
        return _BASICSR_LOAD_RESUME_STATE(opt)
    path = None
    if opt["auto_resume"]:
        folder = os.path.join("experiments", opt["name"], "training_states")
        if os.path.isdir(folder):
            states = [float(name.split(".state")[0]) for name in scandir(folder, suffix="state", recursive=False)]
            if states:
                path = opt["path"]["resume_state"] = os.path.join(folder, f"{max(states):.0f}.state")
    elif opt["path"].get("resume_state"):
        path = opt["path"]["resume_state"]
    if path is None:
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_resume(opt, state["iter"])
    return state


def main() -> None:
    """BasicSR's ``train_pipeline`` with the loss registered, rooted at the current
    directory; the command line is BasicSR's (``-opt``, ``--auto_resume``, ``--launcher``...).
    Resuming works without CUDA too (:func:`load_resume_state`)."""
    import basicsr.train

    register()
    basicsr.train.load_resume_state = load_resume_state  # this process is ours: the entry point
    basicsr.train.train_pipeline(os.getcwd())


if __name__ == "__main__":
    # Run under the module's own name, so that its classes are registered once whoever imports it.
    from d2sm_loss.integrations.basicsr import main as _main

    _main()
else:
    register()

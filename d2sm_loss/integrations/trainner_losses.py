"""The D2SM loss with traiNNer-redux's loss conventions, in a module that does not import
traiNNer.

traiNNer-redux builds a loss from a config entry ``{type: NAME, loss_weight: W, **options}``
by looking the lower-cased ``NAME`` up in its ``LOSS_REGISTRY`` and calling
``cls(loss_weight=W, **options)``. Unlike BasicSR, its model multiplies what a loss returns
by ``abs(loss.loss_weight)`` itself (a negative weight makes it compare the output with the
upscaled low-resolution input instead of the ground truth), and a loss may return a dict of
named terms, each weighted and logged as ``LABEL_NAME``. It calls the losses inside its
autocast region (``use_amp``): the backbone then still runs in float32 unless
``backbone_autocast=True`` (see :class:`~d2sm_loss.SemanticStatisticsLoss`).

- :class:`D2SMLoss` (``type: d2smloss``): the D2SM loss alone.
- :class:`PerceptualD2SMLoss` (``type: perceptuald2smloss``): redux's ``perceptualloss``
  (VGG19 at its conv layers, Charbonnier or L1) and D2SM from one VGG pass, one entry for two.

traiNNer-redux saves networks, optimizers and schedulers only; :func:`save_loss_states` and
:func:`load_loss_states` keep the losses' state (the memory queue, with ``save_queue: true``)
beside its training states, and :func:`keep_loss_states`, which ``d2sm_loss.integrations.trainner`` applies to redux's
``BaseModel``, calls them from its ``save_training_state`` and ``resume_training``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_bool, check_number
from ..layers import LayerSpec
from ..loss import SemanticStatisticsLoss
from ..perceptual import FeatureLosses
from ._config_keys import TRAINNER_KEYS, call_with_config_keys

__all__ = [
    "D2SMLoss", "PerceptualD2SMLoss", "REDUX_LAYER_WEIGHTS", "keep_loss_states", "load_loss_states", "save_loss_states",
]

#: traiNNer-redux's default ``layer_weights`` of ``perceptualloss`` with a conv criterion.
REDUX_LAYER_WEIGHTS: dict[LayerSpec, float] = {
    "conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0,
}
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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

    def forward(self, restored: Tensor, clean: Tensor, **kwargs: Any) -> Tensor:
        """The unweighted loss (the model applies ``loss_weight``); a size error names
        traiNNer-redux's config key."""
        return call_with_config_keys(TRAINNER_KEYS, super().forward, restored, clean, **kwargs)


class PerceptualD2SMLoss(FeatureLosses):
    """traiNNer-redux's ``perceptualloss`` and D2SM from one VGG19 pass
    (``type: perceptuald2smloss``).

    Returns ``{"perceptual": P, "d2sm": d2sm_weight * D2SM}``; the model multiplies each by
    ``loss_weight`` and logs them apart. ``P`` is redux's perceptual loss with a conv criterion:
    ``sum_l w_l * dist(x_l, y_l)`` over VGG19's conv maps (before their ReLU), ImageNet
    normalisation, torchvision's ImageNet weights, replicate padding in the first convolution,
    clamped below at ``clip_min``.

    Args:
        loss_weight: the weight the model applies to both terms.
        layer_weights: ``{layer: weight}`` by VGG names (default :data:`REDUX_LAYER_WEIGHTS`).
        criterion: ``"charbonnier"`` (redux's default) or ``"l1"``. The ReLU-map criteria
            (``"pd"``, ``"fd"``, ``"pd+l1"``, ``"fd+l1"``) are not computed here: keep
            ``perceptualloss`` for them and add a ``d2smloss`` entry.
        d2sm_weight: the D2SM term's weight relative to the perceptual term (required).
        d2sm_layer_weights: ``{layer: weight}`` of the D2SM term (default ``{conv5_4: 1}``).
        alpha: redux's per-layer mix of the two criteria; only all-0 (the conv criterion
            alone, redux's default for conv criteria) is accepted.
        clip_min: the perceptual term's lower bound (redux's ``clip_min``).
        antialiased: must be False (redux's antialiased VGG19 is not built here).
        w_lambda, num_proj_fd, phase_weight_fd, stride_fd, verbose_logging: accepted so that a
            ``perceptualloss`` entry can be reused; they have no effect with a conv criterion.
        **options: the D2SM term's options (``queue_size``, ``save_queue``, ``pretrained``,
            ``checkpoint``...; see :class:`~d2sm_loss.perceptual.FeatureLosses`).
    """

    def __init__(
        self,
        loss_weight: float,
        layer_weights: Mapping[LayerSpec, float] | None = None,
        criterion: str = "charbonnier",
        *,
        d2sm_weight: float,
        d2sm_layer_weights: Mapping[LayerSpec, float] | None = None,
        alpha: list[float] | None = None,
        clip_min: float = 0,
        antialiased: bool = False,
        w_lambda: float = 0.01,
        num_proj_fd: int = 256,
        phase_weight_fd: float = 1.0,
        stride_fd: int = 1,
        verbose_logging: bool = False,
        **options: Any,
    ) -> None:
        if criterion not in ("charbonnier", "l1"):
            raise ValueError(
                f"criterion: perceptuald2smloss computes redux's conv criteria 'charbonnier' and 'l1', got "
                f"{criterion!r}; for 'pd'/'fd' keep a perceptualloss entry and add a d2smloss entry"
            )
        if check_bool("antialiased", antialiased):
            raise ValueError("antialiased: perceptuald2smloss uses torchvision's VGG19; set antialiased: false")
        if alpha is not None and any(check_number("alpha", a) != 0 for a in alpha):
            raise ValueError(f"alpha: only 0 for every layer (the conv criterion alone) is supported, got {alpha}")
        check_bool("verbose_logging", verbose_logging)
        loss_weight = check_number("loss_weight", loss_weight)
        clip_min = check_number("clip_min", clip_min)
        weights: Mapping[LayerSpec, float] = dict(REDUX_LAYER_WEIGHTS) if layer_weights is None else layer_weights
        super().__init__(
            "vgg19", weights, perceptual_weight=1.0, d2sm_weight=d2sm_weight, criterion=criterion,
            d2sm_layer_weights=d2sm_layer_weights, mean=_IMAGENET[0], std=_IMAGENET[1], **options,
        )
        self.loss_weight, self.clip_min = loss_weight, clip_min
        first = self.backbone.get_submodule("features.0")
        if isinstance(first, nn.Conv2d):
            first.padding_mode = "replicate"  # as redux's VGG

    def forward(self, restored: Tensor, clean: Tensor) -> dict[str, Tensor]:
        """``{"perceptual": ..., "d2sm": ...}``, unweighted by ``loss_weight``."""
        terms = call_with_config_keys(TRAINNER_KEYS, super().forward, restored, clean)
        terms["perceptual"] = torch.clamp(terms["perceptual"], min=self.clip_min)
        return terms


def _stateful(losses: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The D2SM losses among ``losses`` whose state holds something (``save_queue=True``)."""
    found = {}
    for label, loss in losses.items():
        d2sm = loss.d2sm if isinstance(loss, FeatureLosses) else loss
        if isinstance(d2sm, SemanticStatisticsLoss) and d2sm.save_queue:
            found[label] = loss
    return found


def save_loss_states(losses: Mapping[str, Any], folder: str, current_iter: int) -> str | None:
    """Write ``{label: state_dict}`` of the D2SM losses with ``save_queue=True`` to
    ``folder/ITER.d2sm.pth`` (beside redux's ``ITER.state``); returns its path, or None when
    no loss has state to keep."""
    stateful = _stateful(losses)
    if not stateful:
        return None
    path = os.path.join(folder, f"{current_iter}.d2sm.pth")
    torch.save({label: loss.state_dict() for label, loss in stateful.items()}, path)
    return path


def load_loss_states(losses: Mapping[str, Any], folder: str, current_iter: int) -> dict[str, int]:
    """Load ``folder/ITER.d2sm.pth`` into the losses it names, if it exists; returns
    ``{label: rows in the memory queue}`` of the losses restored."""
    path = os.path.join(folder, f"{current_iter}.d2sm.pth")
    stateful = _stateful(losses)
    if not stateful or not os.path.exists(path):
        return {}
    device = next((b.device for loss in stateful.values() for b in loss.buffers()), torch.device("cpu"))
    state = torch.load(path, map_location=device, weights_only=True)
    restored = {}
    for label, loss in stateful.items():
        if label in state:
            loss.load_state_dict(state[label])
            d2sm = loss.d2sm if isinstance(loss, FeatureLosses) else loss
            queues = d2sm._queue_list() if isinstance(d2sm, SemanticStatisticsLoss) else []
            restored[label] = queues[0].count if queues else 0
    return restored


def keep_loss_states(model_class: Any) -> None:
    """Extend ``model_class.save_training_state`` / ``resume_training`` (redux's signatures) to
    save and load the state of the model's D2SM losses (``model.losses``) beside its training
    states. Repeat calls do nothing."""
    if getattr(model_class.save_training_state, "_d2sm_keeps_state", False):
        return
    save, resume = model_class.save_training_state, model_class.resume_training

    @functools.wraps(save)
    def save_training_state(self: Any, epoch: int, current_iter: int) -> None:
        save(self, epoch, current_iter)
        if current_iter != -1 and getattr(self.opt, "rank", 0) in (0, None):
            save_loss_states(getattr(self, "losses", None) or {}, self.opt.path.training_states, current_iter)

    @functools.wraps(resume)
    def resume_training(self: Any, resume_state: Any) -> None:
        resume(self, resume_state)
        folder = self.opt.path.training_states
        restored = load_loss_states(getattr(self, "losses", None) or {}, folder, resume_state["iter"])
        for label, rows in restored.items():
            logging.getLogger("traiNNer").info("D2SM loss state of %s restored (memory queue: %d rows)", label, rows)

    save_training_state._d2sm_keeps_state = True  # type: ignore[attr-defined]
    model_class.save_training_state, model_class.resume_training = save_training_state, resume_training

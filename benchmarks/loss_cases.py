"""What the training-step benchmark measures, one small function per thing measured.

Every loss is used through its public seam (``loss(restored, clean)``, ``loss.rows``,
``loss.statistic``; the peers in :mod:`benchmarks.baselines` have the same three), never
re-implemented here:

- :func:`step_case`: one training step of the denoiser: ``zero_grad``, forward,
  ``L1 + 0.1 * loss``, ``backward``, ``Adam.step``; eager or ``torch.compile``-d, float32 or
  under ``torch.autocast`` (a :class:`Variant`).
- :func:`loss_case`: the loss alone, forward + backward into restored images that require grad.
- :func:`rows_case` (row part ``backbone``): ``loss.rows`` (input preparation, the backbone
  on both batches, samples, the queue attached) and the backward of a random
  upstream gradient into the restored images.
- :func:`statistic_case`: ``loss.statistic`` on random rows of the shapes ``rows`` gives,
  forward + backward, and the memory queue's push (its cache update) where there is one.

Inputs are fresh for every call: clean images ``torch.rand``, noisy ones ``clean + 0.1 randn``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.baselines import ContextualLoss, DenseKL, PerceptualLoss
from benchmarks.measure import Case
from d2sm_loss import LayerRows, SemanticStatisticsLoss

AUX_WEIGHT = 0.1
CONFIGS = {
    "l1": "(a) L1",
    "vgg": "(b) L1 + VGG perceptual conv5_4",
    "paper": "(c) L1 + D2SM paper (image, conv5_4, queue 224)",
    "loc-streaming": "(d) L1 + D2SM location, streaming",
    "loc-triton": "(e) L1 + D2SM location, triton",
    "contextual": "(f) L1 + contextual loss, location",
    "dense-kl": "D2SM statistic, dense N x N (no step)",
}
SHORT = {"l1": "a", "vgg": "b", "paper": "c", "loc-streaming": "d", "loc-triton": "e", "contextual": "f", "dense-kl": "dense"}
#: Configurations built with a fixed similarity-KL implementation; a row that ran another is an error.
FORCED_IMPLEMENTATION = {"loc-streaming": "streaming", "loc-triton": "triton"}
LOCATION_CONFIGS = ("loc-streaming", "loc-triton", "contextual")


@dataclass(frozen=True)
class Variant:
    """How a step runs: compiled or not, under autocast (which dtype) or not, and for the
    D2SM losses whether the backbone follows autocast (``backbone_autocast``)."""

    name: str = "eager"
    compiled: bool = False
    autocast: torch.dtype | None = None
    backbone_autocast: bool | None = None


def is_d2sm(loss: Any) -> bool:
    return isinstance(loss, SemanticStatisticsLoss)


def with_options(loss: Any, **options: Any) -> Any:
    """A shallow copy of ``loss`` with some attributes changed (same backbone and queue)."""
    other = copy.copy(loss)
    for name, value in options.items():
        setattr(other, name, value)
    return other


def build_losses(configs: list[str], device: torch.device, backbone: str = "vgg19", weights: str | None = None,
                 location_layer: str | None = None, check_inputs: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """The losses of ``configs`` (built once, reused for every image size) and skip reasons.

    ``paper``: :meth:`SemanticStatisticsLoss.paper` (VGG19 conv5_4, image granularity,
    queue of 224) for ``backbone="vgg19"`` without weights, else the same on ``backbone``'s
    default layer. The location configurations share one location-granularity loss
    (``location_layer``, default VGG19 relu3_4 ``features.17``), so that the contextual
    loss and the dense KL see the same samples. Random weights unless ``weights``.
    """
    common = {"pretrained": False, "checkpoint": weights, "check_inputs": check_inputs}
    losses: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "vgg" in configs:
            losses["vgg"] = PerceptualLoss(device)
        if "paper" in configs:
            if backbone == "vgg19" and weights is None:
                paper = SemanticStatisticsLoss.paper(pretrained=False, check_inputs=check_inputs)
            else:
                paper = SemanticStatisticsLoss(backbone, queue_size=224, **common)
            losses["paper"] = paper.to(device)
        if any(c in configs for c in LOCATION_CONFIGS):
            layer = location_layer or ("features.17" if backbone == "vgg19" else None)
            location = SemanticStatisticsLoss(backbone, layers=layer, granularity="location", implementation="streaming",
                                              **common).to(device)
            losses["loc-streaming"], losses["contextual"], losses["dense-kl"] = \
                location, ContextualLoss(location), DenseKL(location)
            if "loc-triton" in configs:
                reason = triton_skip_reason(device)
                if reason:
                    skipped["loc-triton"] = reason
                else:
                    losses["loc-triton"] = with_options(location, implementation="triton")
    return losses, skipped


def triton_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "no CUDA device (the Triton kernels need a GPU)"
    from d2sm_loss.functional import _triton_error

    return _triton_error()


def fill_queue(loss: Any, batch: int, height: int, width: int, device: torch.device) -> None:
    """Fill the loss's memory queues with random rows of the right width: the steady state
    of training (a queue is full after ``queue_size / batch`` steps), loaded as a checkpoint
    of the queue would be (which rebuilds its cache). No-op without queues."""
    queues = getattr(loss, "queues", None)
    if not queues:
        return
    loss.reset_queue()
    for layer_rows, queue in zip(probe_rows(loss, batch, height, width, device), queues):
        width_d = layer_rows.restored.shape[-1]
        state = {"restored": torch.randn(queue.size, width_d, device=device),
                 "clean": torch.randn(queue.size, width_d, device=device),
                 "position": torch.zeros((), dtype=torch.long), "_extra_state": {"size": queue.size}}
        queue.load_state_dict(state)
        if queue.count != queue.size:
            raise RuntimeError(f"fill_queue: queue of layer {layer_rows.layer} holds {queue.count} of {queue.size} rows")


def images(batch: int, height: int, width: int, device: torch.device, grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Fresh (restored, clean) images in [0, 1]; ``restored`` requires grad when ``grad``."""
    restored = torch.rand(batch, 3, height, width, device=device, requires_grad=grad)
    return restored, torch.rand(batch, 3, height, width, device=device)


def row_shape(rows: list[LayerRows]) -> dict[str, int]:
    """G, N, D of the first layer's rows: (N, D) is one group (the batch plus the queue's
    filled rows), (G, N, D) per-image groups, a feature map (B, C, h, w) counts as one row
    of C h w per image."""
    shape = tuple(rows[0].restored.shape)
    if len(shape) == 2:
        queued = rows[0].queue.count if rows[0].queue is not None else 0
        return {"G": 1, "N": shape[0] + queued, "D": shape[1]}
    if len(shape) == 3:
        return {"G": shape[0], "N": shape[1], "D": shape[2]}
    return {"G": shape[0], "N": 1, "D": math.prod(shape[1:])}


def _implementation_reader(case: Case, loss: Any) -> Callable[[], None]:
    def read() -> None:
        case.info["implementation"] = getattr(loss, "last_implementation", "") or ""

    return read


# --- the measuring functions ------------------------------------------------------


def step_case(config: str, loss: Any, net: nn.Module, batch: int, height: int, width: int, device: torch.device,
              variant: Variant = Variant(), backend: str = "inductor") -> Case:
    """One training step of ``net`` with ``L1 + AUX_WEIGHT * loss`` (L1 alone for ``None``);
    ``torch.compile(step, backend=backend)`` for a compiled variant."""
    if variant.backbone_autocast is not None and is_d2sm(loss):
        loss = with_options(loss, backbone_autocast=variant.backbone_autocast)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step(noisy: torch.Tensor, clean: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        region = torch.autocast(device.type, dtype=variant.autocast) if variant.autocast else contextlib.nullcontext()
        with region:
            restored = net(noisy)
            total = F.l1_loss(restored, clean)
            if loss is not None:
                total = total + AUX_WEIGHT * loss(restored, clean)
        total.backward()
        optimizer.step()

    def prepare() -> tuple[torch.Tensor, torch.Tensor]:
        clean = torch.rand(batch, 3, height, width, device=device)
        return clean + 0.1 * torch.randn_like(clean), clean

    info: dict[str, Any] = {"variant": variant.name}
    run: Callable[[Any], None] = lambda state: step(*state)  # noqa: E731
    if variant.compiled:
        run = _counting_graphs(torch.compile(step, backend=backend), info)
    case = Case(f"{config} step {variant.name}", prepare, run, info)
    if loss is not None:
        case.after_call = _implementation_reader(case, loss)
    return case


def _counting_graphs(compiled: Callable, info: dict[str, Any]) -> Callable[[Any], None]:
    """``compiled(*state)``, appending to ``info["graphs_per_call"]`` how many graphs dynamo
    compiled during the call and adding the graph breaks it met to ``info["graph_breaks"]``."""
    from torch._dynamo.utils import counters

    def run(state: Any) -> None:
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        compiled(*state)
        info.setdefault("graphs_per_call", []).append(counters["stats"]["unique_graphs"] - graphs)
        info["graph_breaks"] = info.get("graph_breaks", 0) + sum(counters["graph_break"].values()) - breaks

    return run


def loss_case(config: str, loss: Any, batch: int, height: int, width: int, device: torch.device) -> Case:
    """The whole loss, forward + backward."""
    case = Case(f"{config} loss", lambda: images(batch, height, width, device, grad=True),
                lambda state: loss(*state).backward())
    case.after_call = _implementation_reader(case, loss)
    return case


def probe_rows(loss: Any, batch: int, height: int, width: int, device: torch.device) -> list[LayerRows]:
    """The rows of a training call (with the memory queue attached; rows() does not push)."""
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = loss.rows(*images(batch, height, width, device))
    return [LayerRows(r.layer, r.weight, r.restored.detach(), r.clean, r.batch_rows, r.queue) for r in rows]


def rows_case(config: str, loss: Any, batch: int, height: int, width: int, device: torch.device) -> Case:
    """``loss.rows`` and the backward of a random upstream gradient into the restored images."""
    shapes = [r.restored.shape for r in probe_rows(loss, batch, height, width, device)]

    def prepare() -> tuple[Any, ...]:
        return (*images(batch, height, width, device, grad=True), [torch.randn(s, device=device) for s in shapes])

    def run(state: tuple[Any, ...]) -> None:
        restored, clean, grads = state
        torch.autograd.backward([r.restored for r in loss.rows(restored, clean)], grads)

    return Case(f"{config} rows", prepare, run)


def statistic_case(config: str, loss: Any, batch: int, height: int, width: int, device: torch.device) -> Case:
    """``loss.statistic`` on random rows of the shapes ``loss.rows`` gives, forward + backward,
    and for a loss with a memory queue the queue's push (the cache update), as a training
    call runs them."""
    probe = probe_rows(loss, batch, height, width, device)

    def prepare() -> list[LayerRows]:
        return [LayerRows(r.layer, r.weight, torch.randn(r.restored.shape, device=device, requires_grad=True),
                          torch.randn(r.clean.shape, device=device), r.batch_rows, r.queue) for r in probe]

    def run(rows: list[LayerRows]) -> None:
        if not hasattr(loss, "_statistic"):  # a peer loss with the same seam
            loss.statistic(rows).backward()
            return
        value, blocks = loss._statistic(rows)
        value.backward()
        for layer_rows, layer_blocks in zip(rows, blocks):
            if layer_rows.queue is not None and layer_blocks is not None:
                layer_rows.queue.push(layer_rows.restored, layer_rows.clean, layer_blocks)

    case = Case(f"{config} statistic", prepare, run, row_shape(probe))
    case.after_call = _implementation_reader(case, loss)
    return case

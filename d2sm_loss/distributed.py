"""Gathering feature rows across torch.distributed ranks, with autograd.

At image and patch granularity the statistic compares samples with each other, so
under DistributedDataParallel every rank gathers the rows of all ranks and computes the
statistic over the global batch. All ranks then hold the same rows in the same order
(rank 0's first), compute the same loss value, and update their queues identically.

Gradient convention: every rank computes the same loss ``L`` over the global batch;
the gradient that flows back to a rank's own rows is the exact partial derivative
``dL/dx_own`` multiplied by ``grad_scale``. With ``grad_scale = world_size`` (what
:class:`~d2sm_loss.SemanticStatisticsLoss` uses by default) DDP's averaging of
parameter gradients over ranks gives exactly the single-process update: the same
convention as a pixel loss averaged over each rank's local batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .rows import LayerRows

__all__ = ["distributed_world", "gather_batch_sizes", "gather_layer_rows", "gather_rows"]


def distributed_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` when torch.distributed is initialised with several ranks, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def gather_batch_sizes(size: int, device: torch.device) -> list[int]:
    """Every rank's ``size`` (one small all-gather), so ranks may hold different batch sizes.

    The sizes are needed on the host to pad and split the rows, so this costs one device
    synchronisation per call (once per loss call, not per layer)."""
    local = torch.tensor([size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return torch.cat(sizes).tolist()


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, sizes: list[int], rank: int, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.offset, ctx.count, ctx.grad_scale = sum(sizes[:rank]), sizes[rank], grad_scale
        longest = max(sizes)
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Every rank computed the same loss from the same gathered rows, so the local
        # gradient of this rank's slice already is dL/dx_own: no communication needed.
        own = grad[ctx.offset : ctx.offset + ctx.count]
        return own * ctx.grad_scale if ctx.grad_scale != 1 else own, None, None, None


def gather_rows(rows: Tensor, sizes: list[int], *, grad_scale: float = 1.0) -> Tensor:
    """Concatenate the ``rows`` (n_r, ...) of all ranks in rank order.

    ``sizes`` holds every rank's row count (see :func:`gather_batch_sizes`). The
    gradient for this rank's rows is its slice of the incoming gradient times
    ``grad_scale``; rows from other ranks receive none.
    """
    world = distributed_world()
    if world is None:
        return rows
    rank, _ = world
    if rows.shape[0] != sizes[rank]:
        raise ValueError(f"gather_rows: this rank has {rows.shape[0]} rows but sizes says {sizes[rank]}")
    return _GatherRows.apply(rows, sizes, rank, float(grad_scale))


def gather_layer_rows(rows: list[LayerRows], ddp_gradient_scale: bool) -> list[LayerRows]:
    """Every rank's rows of every layer, in rank order (unchanged without torch.distributed).
    One synchronisation for the batch sizes of all layers; the gradient of the own rows is
    scaled by the world size when ``ddp_gradient_scale`` (see the module's docstring)."""
    from .rows import LayerRows

    world = distributed_world()
    if world is None:
        return rows
    sizes = gather_batch_sizes(rows[0].restored.shape[0], rows[0].restored.device)
    scale = world[1] if ddp_gradient_scale else 1.0
    return [
        LayerRows(
            r.layer, r.weight, gather_rows(r.restored, sizes, grad_scale=scale), gather_rows(r.clean, sizes), sum(sizes)
        )
        for r in rows
    ]

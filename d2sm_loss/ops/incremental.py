"""The similarity-KL statistic over a batch plus a memory queue, computed incrementally.

The rows of one group are this call's ``B`` batch rows (restored ``x_b`` with a gradient,
clean ``y_b``) followed by the ``M`` valid rows of a queue of capacity ``K`` (``M <= K``;
detached constants: earlier batches). With ``l_ij = log s(c_ij)`` (restored) and
``m_ij = log s(d_ij)`` (clean), the statistic of row ``i`` is (see :mod:`.reference`)::

    KL_i = sum_j p_ij (m_ij - l_ij) - LZy_i + LZx_i,   p_ij = exp(m_ij - LZy_i)
    LZx_i = log sum_j exp(l_ij),   LZy_i = log sum_j exp(m_ij)

with ``j`` over all ``B + M`` rows (``j != i`` when ``include_self`` is False).

Queue rows do not change while they stay in the queue, so for a queue row ``q`` the sums
over the queue's own columns are constants between pushes. The queue keeps them, derived
from a cache of the pairwise log-similarities among its rows (two ``K x K`` matrices, one
per side)::

    LZx^Q_q = log sum_{j in Q} exp(l_qj)     LZy^Q_q = log sum_{j in Q} exp(m_qj)
    W^Q_q   = sum_{j in Q} exp(m_qj - LZy^Q_q) (m_qj - l_qj)

kept per column block of ``b ~ sqrt(K)`` columns (the same three sums over the block's
columns, :func:`block_sums`) and combined over blocks (:func:`combine_blocks`): a push
recomputes only the blocks that hold a written column and the written rows, so no sum
accumulates rounding from step to step (nothing is ever subtracted). A call then needs
only the new blocks, batch x batch and batch x queue: for a batch row, the plain
statistic over its ``B + K`` columns with the
unfilled queue columns masked out; for a queue row ``q``, the cached sums merged with its
``B`` batch columns::

    LZx_q = logaddexp(LZx^Q_q, log sum_b exp(l_qb))        (LZy_q likewise)
    KL_q  = exp(LZy^Q_q - LZy_q) W^Q_q + sum_b p_qb (m_qb - l_qb) - LZy_q + LZx_q

(:func:`queue_statistic`). Unfilled queue slots are excluded exactly: their columns get
``-inf`` log-similarities (weight ``exp(-inf) = 0``) and their rows a KL of 0 outside the
row count. Everything is written with ordinary differentiable torch operations on the
``B x (B + K)`` blocks, so autograd restricts the backward to the batch rows (the queue
is a constant) and derivatives of every order are exact: second-order calls need no
fallback.

Cost per call, with ``D`` features: forward ``2 B (B + K) D`` multiply-adds for the two
similarity blocks, backward ``B (B + K) D`` more for the restored side, plus
``O(B (B + K))`` elementwise work; a push updates the cache from those blocks and
refreshes the sums, ``O(K (B + 3 b))`` elementwise work and no product over ``D``. The
full computation costs ``O((B + M)^2 D)`` per call. Memory: the two ``K x K`` matrices
(padded to a multiple of ``b`` columns), ``3 K K / b`` block sums and a few
``K``-vectors beside the queue's own ``2 K D`` rows; the per-call blocks are
``O(B (B + K))``. On a GPU the two block products are cuBLAS matrix products.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .reference import NORM_EPS, _row_norms, kl_from_log_conditionals, log_conditionals, log_similarity

__all__ = [
    "Blocks", "Journal", "QueueSums", "block_size", "block_sums", "combine_blocks", "inverse_norms",
    "pairwise_log_similarities", "queue_statistic",
]


class QueueSums(NamedTuple):
    """The sums of each queue row over the queue's own valid columns (``K``-vectors)."""

    log_zx: Tensor
    log_zy: Tensor
    w: Tensor


class Blocks(NamedTuple):
    """The detached log-similarity blocks of a call, reused to update the cache on a push:
    batch x batch ``(B, B)`` and batch x queue ``(B, K)``, restored and clean."""

    xx: Tensor
    yy: Tensor
    xq: Tensor
    yq: Tensor


class Journal:
    """The rows a queue's push overwrote, linked in push order: a pending backward that
    holds the entry open at its forward recovers the rows it was computed from, so that
    pushes may write the queue's rows in place (no copy of the ``K x D`` rows a step)."""

    __slots__ = ("index", "old", "next")

    def __init__(self) -> None:
        self.index: Tensor | None = None
        self.old: Tensor | None = None
        self.next: Journal | None = None

    def record(self, index: Tensor, old: Tensor) -> Journal:
        """Fill this entry with the overwritten rows; returns the next open entry."""
        self.index, self.old, self.next = index, old, Journal()
        return self.next


class _QueueProduct(torch.autograd.Function):
    """``(u @ Q^T) * inverse``, with the gradient of ``u`` only; ``Q`` as it was at the
    forward, from the live rows and the journal of the pushes since."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, unit: Tensor, queue: Tensor, inverse: Tensor, journal: Journal
    ) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.queue, ctx.journal = queue, journal  # not saved: pushes write it in place
        return (unit @ queue.transpose(0, 1)) * inverse

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        queue, entry = ctx.queue, ctx.journal
        scaled = grad * inverse
        patches = []
        while entry is not None and entry.index is not None:
            patches.append((entry.index, entry.old))
            entry = entry.next
        if len(patches) == 1:  # the usual case: this call's own push
            index, old = patches[0]
            return scaled @ queue + scaled[:, index] @ (old - queue[index]), None, None, None
        if patches:  # several pushes before this backward: rebuild the rows of the forward
            queue = queue.clone()
            for index, old in reversed(patches):
                queue[index] = old
        return scaled @ queue, None, None, None


def inverse_norms(rows: Tensor) -> Tensor:
    """``1 / max(|r_i|, NORM_EPS)`` of each row, shape ``(K,)``."""
    return 1.0 / _row_norms(rows).clamp_min(NORM_EPS).squeeze(-1)


def pairwise_log_similarities(rows: Tensor, similarity: str, temperature: float) -> Tensor:
    """``log s(c_ij)`` for every pair of ``rows`` (K, D) -> (K, K): ``O(K^2 D)``."""
    unit = rows * inverse_norms(rows).unsqueeze(-1)
    return log_similarity(unit @ unit.transpose(-1, -2), similarity, temperature)


def block_size(size: int) -> int:
    """The column block of the cached sums for a queue of ``size`` rows: about ``sqrt(size)``."""
    return max(1, math.isqrt(size))


def block_sums(
    log_x: Tensor, log_y: Tensor, rows: Tensor, blocks: Tensor, block: int, filled: Tensor, include_self: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-block sums of the queue rows ``rows`` (R,) over the column blocks ``blocks`` (M,)
    of the cached (R, size_padded) log-similarities: ``(R, M)`` each, ``log sum exp l``,
    ``log sum exp m`` and ``sum exp(m - log sum exp m) (m - l)`` over the block's filled
    columns (``j != row`` without ``include_self``); ``-inf, -inf, 0`` for a block without
    such columns. ``O(R M block)``."""
    columns = blocks.unsqueeze(-1) * block + torch.arange(block, device=blocks.device)  # (M, b)
    keep = (columns < filled).unsqueeze(0)  # (1, M, b)
    if not include_self:
        keep = keep & (columns.unsqueeze(0) != rows.view(-1, 1, 1))
    shape = (log_x.shape[0], -1, block)
    lx = log_x.view(shape).index_select(1, blocks)
    ly = log_y.view(shape).index_select(1, blocks)
    zx = torch.logsumexp(lx.masked_fill(~keep, float("-inf")), dim=-1)
    zy = torch.logsumexp(ly.masked_fill(~keep, float("-inf")), dim=-1)
    p = torch.exp(ly - torch.where(torch.isfinite(zy), zy, 0.0).unsqueeze(-1))
    w = torch.where(keep, p * (ly - lx), 0.0).sum(dim=-1)
    return zx, zy, w


def combine_blocks(zx: Tensor, zy: Tensor, w: Tensor) -> QueueSums:
    """The queue rows' sums over all their columns from the per-block sums (R, M):
    ``O(R M)``. A row without columns gets ``-inf`` log-sums and ``w = 0`` (it then
    compares with the batch rows only)."""
    log_zx = torch.logsumexp(zx, dim=-1)
    log_zy = torch.logsumexp(zy, dim=-1)
    finite = torch.isfinite(zy) & torch.isfinite(log_zy).unsqueeze(-1)
    weight = torch.exp(torch.where(finite, zy - log_zy.unsqueeze(-1), float("-inf")))
    return QueueSums(log_zx, log_zy, (weight * w).sum(dim=-1))


def _batch_rows_kl(lx: Tensor, ly: Tensor, columns: Tensor) -> Tensor:
    """Per-row KL over the masked columns of (B, B + K) log-similarities (the reference's
    formula, :func:`~.reference.kl_from_log_conditionals`); 0 for a row without columns."""
    return kl_from_log_conditionals(log_conditionals(lx, columns), log_conditionals(ly, columns), columns)


def queue_statistic(
    x: Tensor,
    y: Tensor,
    queue_x: Tensor,
    queue_y: Tensor,
    inverse_x: Tensor,
    inverse_y: Tensor,
    count: Tensor,
    sums: QueueSums,
    *,
    similarity: str,
    temperature: float,
    include_self: bool,
    journal: Journal | None = None,
) -> tuple[Tensor, Tensor, Blocks]:
    """Per-row KL of the batch rows ``x``, ``y`` (B, D) and of the queue rows.

    ``queue_x``, ``queue_y`` (K, D) are the queue's buffers with their inverse row norms,
    of which the first ``count`` (a 0-d tensor) are filled; ``sums`` their cached sums
    (:func:`combine_blocks`). All tensors in one floating dtype. With a ``journal``
    (the queue's open :class:`Journal` entry) the backward may run after pushes that wrote
    ``queue_x`` in place; without one, ``queue_x`` must not change before the backward. Returns the batch rows' KL
    ``(B,)``, the queue rows' KL ``(K,)`` (0 for unfilled slots) and the detached
    :class:`Blocks`. The gradient flows into ``x`` only.
    """
    batch, slots = x.shape[0], queue_x.shape[0]
    unit_x = x * inverse_norms(x).unsqueeze(-1)
    with torch.no_grad():
        unit_y = y * inverse_norms(y).unsqueeze(-1)
        yy = log_similarity(unit_y @ unit_y.transpose(0, 1), similarity, temperature)
        yq = log_similarity((unit_y @ queue_y.transpose(0, 1)) * inverse_y, similarity, temperature)
    xx = log_similarity(unit_x @ unit_x.transpose(0, 1), similarity, temperature)
    if journal is None:
        cosine_xq = (unit_x @ queue_x.transpose(0, 1)) * inverse_x
    else:
        cosine_xq = _QueueProduct.apply(unit_x, queue_x, inverse_x, journal)
    xq = log_similarity(cosine_xq, similarity, temperature)
    valid = torch.arange(slots, device=x.device) < count

    own = torch.ones(batch, batch, dtype=torch.bool, device=x.device)
    if not include_self:
        own = ~torch.eye(batch, dtype=torch.bool, device=x.device)
    columns = torch.cat([own, valid.unsqueeze(0).expand(batch, -1)], dim=1)
    kl_batch = _batch_rows_kl(torch.cat([xx, xq], dim=1), torch.cat([yy, yq], dim=1), columns)

    lx, ly = xq.transpose(0, 1), yq.transpose(0, 1)  # (K, B): queue row q, batch column b
    log_zx = torch.logsumexp(torch.cat([sums.log_zx.unsqueeze(-1), lx], dim=1), dim=1)
    log_zy = torch.logsumexp(torch.cat([sums.log_zy.unsqueeze(-1), ly], dim=1), dim=1)
    p = torch.exp(ly - log_zy.unsqueeze(-1))
    kl_queue = torch.exp(sums.log_zy - log_zy) * sums.w + (p * (ly - lx)).sum(dim=1) - log_zy + log_zx
    kl_queue = torch.where(valid, kl_queue, 0.0)
    return kl_batch, kl_queue, Blocks(xx.detach(), yy, xq.detach(), yq)

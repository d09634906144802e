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

(:func:`queue_sums`). A call then needs only the new blocks, batch x batch and
batch x queue: for a batch row, the plain statistic over its ``B + K`` columns with the
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
``O(B (B + K))`` elementwise work; after a push the queue refreshes its cached sums from
the ``K x K`` matrices, ``O(K^2)`` elementwise work and no product over ``D``. The full
computation costs ``O((B + M)^2 D)`` per call. Memory: the two ``K x K`` matrices and a
few ``K``-vectors beside the queue's own ``2 K D`` rows; the per-call blocks are
``O(B (B + K))``. On a GPU the two block products are cuBLAS matrix products.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .reference import NORM_EPS, _row_norms, log_similarity

__all__ = ["Blocks", "QueueSums", "inverse_norms", "pairwise_log_similarities", "queue_statistic", "queue_sums"]


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


def inverse_norms(rows: Tensor) -> Tensor:
    """``1 / max(|r_i|, NORM_EPS)`` of each row, shape ``(K,)``."""
    return 1.0 / _row_norms(rows).clamp_min(NORM_EPS).squeeze(-1)


def pairwise_log_similarities(rows: Tensor, kernel: str, temperature: float) -> Tensor:
    """``log s(c_ij)`` for every pair of ``rows`` (K, D) -> (K, K): ``O(K^2 D)``."""
    unit = rows * inverse_norms(rows).unsqueeze(-1)
    return log_similarity(unit @ unit.transpose(-1, -2), kernel, temperature)


def _columns(valid: Tensor, include_self: bool) -> Tensor:
    """The (K, K) mask of the columns each queue row sums over."""
    columns = valid.unsqueeze(0).expand(valid.shape[0], -1)
    if not include_self:
        columns = columns & ~torch.eye(valid.shape[0], dtype=torch.bool, device=valid.device)
    return columns


def queue_sums(log_x: Tensor, log_y: Tensor, valid: Tensor, include_self: bool) -> QueueSums:
    """The queue rows' sums over the queue's valid columns from the cached (K, K)
    log-similarity matrices; ``O(K^2)``. A row without columns gets ``-inf`` log-sums
    and ``w = 0`` (it then compares with the batch rows only)."""
    columns = _columns(valid, include_self)
    lx = log_x.masked_fill(~columns, float("-inf"))
    ly = log_y.masked_fill(~columns, float("-inf"))
    log_zx = torch.logsumexp(lx, dim=-1)
    log_zy = torch.logsumexp(ly, dim=-1)
    has = columns.any(dim=-1)
    p = torch.exp(ly - torch.where(has, log_zy, 0.0).unsqueeze(-1))
    w = torch.where(columns, p * (log_y - log_x), 0.0).sum(dim=-1)
    return QueueSums(log_zx, log_zy, w)


def _batch_rows_kl(lx: Tensor, ly: Tensor, columns: Tensor) -> Tensor:
    """Per-row KL over the masked columns of (B, B + K) log-similarities; 0 for a row
    without columns."""
    has = columns.any(dim=-1, keepdim=True)
    keep = columns | ~has  # a row without columns: finite dummies, zeroed below
    lpx = torch.log_softmax(lx.masked_fill(~keep, float("-inf")), dim=-1)
    lpy = torch.log_softmax(ly.masked_fill(~keep, float("-inf")), dim=-1)
    diff = torch.where(columns, lpy - torch.where(columns, lpx, 0.0), 0.0)
    return (torch.where(columns, lpy.exp(), 0.0) * diff).sum(dim=-1)


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
    kernel: str,
    temperature: float,
    include_self: bool,
) -> tuple[Tensor, Tensor, Blocks]:
    """Per-row KL of the batch rows ``x``, ``y`` (B, D) and of the queue rows.

    ``queue_x``, ``queue_y`` (K, D) are the queue's buffers with their inverse row norms,
    of which the first ``count`` (a 0-d tensor) are filled; ``sums`` their cached sums
    (:func:`queue_sums`). All tensors in one floating dtype. Returns the batch rows' KL
    ``(B,)``, the queue rows' KL ``(K,)`` (0 for unfilled slots) and the detached
    :class:`Blocks`. The gradient flows into ``x`` only.
    """
    batch, slots = x.shape[0], queue_x.shape[0]
    unit_x = x * inverse_norms(x).unsqueeze(-1)
    with torch.no_grad():
        unit_y = y * inverse_norms(y).unsqueeze(-1)
        yy = log_similarity(unit_y @ unit_y.transpose(0, 1), kernel, temperature)
        yq = log_similarity((unit_y @ queue_y.transpose(0, 1)) * inverse_y, kernel, temperature)
    xx = log_similarity(unit_x @ unit_x.transpose(0, 1), kernel, temperature)
    xq = log_similarity((unit_x @ queue_x.transpose(0, 1)) * inverse_x, kernel, temperature)
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

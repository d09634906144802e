"""The similarity-KL statistic in plain PyTorch with bounded memory.

:func:`similarity_kl_streaming` computes exactly the statistic of
:func:`d2sm_loss.ops.reference.similarity_kl_reference` (same constants, same
definition), but never holds an N x N matrix. A custom :class:`torch.autograd.Function`
walks over blocks of ``b`` rows; for each block it forms the (G, b, N) tiles of the
restored and clean kernels, reduces them to per-row quantities and drops them.

Forward, per row block ``I`` (all G groups at once)::

    S_x = s(Xh_I Xh^T)          S_y = s(Yh_I Yh^T)            (G, b, N) tiles
    log Zx_I = logsumexp_j log S_x     log Zy_I likewise       (j != i if not include_self)
    KL_I = sum_j py_ij (log py_ij - log px_ij)

Saved for backward: the inputs ``X``, ``Y`` themselves (references, no copies), the row scales and
norms ``|x_i|`` and the log-normalisers ``log Zx``, ``log Zy`` (G, N): no N x N matrix.
The backward recomputes the unit rows (O(G N D)) and then, per row block, both tiles::

    Gm_ij = g_i (px_ij - py_ij) dlog s/dc(c_ij)
    dXh_I += Gm Xh                (the rows of the block)
    dXh   += Gm^T Xh_I            (the columns, since c is symmetric)

and finally ``dx_i = (dxh_i - xh_i (xh_i . dxh_i)) / |x_i|`` for nonzero rows, else
``dxh_i / NORM_EPS`` (as autograd takes it for the reference). Rows are divided by a power
of two near their largest entry before their norm is taken
(:func:`~d2sm_loss.ops.reference.row_scale`), so any finite magnitude works.

Cost per group (N rows, D features):

- FLOPs: forward 2 tile products of ``2 N^2 D`` each, ``4 N^2 D``; backward recomputes
  them (``4 N^2 D``) and adds ``Gm Xh`` and ``Gm^T Xh_I`` (``4 N^2 D``): ``8 N^2 D``.
  Plus ``O(N^2)`` elementwise work (one log or exp per tile entry and a few
  multiplications and additions), which dominates for small D on the CPU.
- Memory: saved state the two inputs (``2 G N D`` values, shared with the caller's
  tensors), the ``G N`` row norms and ``2 G N`` log-normalisers; transient working set
  exactly three (G, b, N) tile buffers, allocated once per pass and reused by every block
  (every tile operation writes into them with ``out=`` or in place, the softmax
  logsumexp included), plus O(G b D) block products, the recomputed unit rows and the
  (G, N, D) gradient accumulator. With ``block_size=None`` the block size is
  ``b = max(1, min(N, TILE_ELEMENTS // (G * N)))``, so one tile holds about
  :data:`TILE_ELEMENTS` values whatever N is: peak extra memory ``O(G b N)`` =
  ``O(TILE_ELEMENTS)`` until ``G * N`` exceeds it (then ``b = 1``, ``O(G N)``).

Numerics: the cosine similarity's similarities lie in ``[COSINE_ETA, 1 + COSINE_ETA]``, so
its normaliser is summed directly (``log Z = log sum_j s``, which is the logsumexp of
``log s`` and cannot under- or overflow); the softmax similarity takes a logsumexp of
``(c - 1) / temperature`` (row maximum subtracted before ``exp``), so a small
temperature with ``include_self=False`` never underflows. Restored and clean tiles go
through the same operations, so identical inputs give exactly zero loss and exactly
zero gradient.

Second derivatives: when the backward runs with gradient recording on
(``torch.autograd.grad(..., create_graph=True)``), it returns the reference's gradient
instead, computed differentiably from the saved input ``X``
(:func:`d2sm_loss.ops.reference.similarity_kl_vjp`): derivatives of every order then
equal the reference's, at the reference's O(G N^2) memory. An ordinary backward takes
the streaming path above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import COSINE_ETA, NORM_EPS, SIMILARITIES, row_scale, similarity_kl_vjp

__all__ = ["TILE_ELEMENTS", "TILE_ELEMENTS_GPU", "similarity_kl_streaming", "default_block_size"]

#: Target number of values in one (G, b, N) tile when ``block_size`` is None:
#: 2**20 (4 MiB in float32). The forward and backward keep three such tiles, so the
#: transient memory stays around 12 MiB (float32) for any N with
#: ``G * N <= TILE_ELEMENTS``. Measured on a 2-core AMD EPYC CPU (G=1, N=4096, D=64,
#: forward+backward, one thread): peak resident memory above the inputs 16 MiB
#: (b=256) against 53 MiB for 2**22-value tiles (b=1024) and 402 MiB for the
#: reference; b in 128..512 were the fastest of b in 32..1024 (tiles of a few MiB stay in
#: the last-level cache while the elementwise passes run over them).
TILE_ELEMENTS = 1 << 20

#: The tile budget on a GPU, 2**24 values (64 MiB in float32, about 200 MiB for the three
#: buffers). A GPU needs large tiles to amortise its similarity launches: with the CPU budget a
#: (G=8, N=16384) problem would walk 8-row blocks, about 2000 blocks of a dozen launches each
#: per pass. Chosen from that launch count, not yet tuned on hardware.
TILE_ELEMENTS_GPU = 1 << 24


def default_block_size(groups: int, rows: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """Rows per block so that a (groups, b, rows) tile holds about ``tile_elements`` values."""
    return max(1, min(rows, tile_elements // max(1, groups * rows)))


def _unit_rows(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(unit rows, |scaled row|, scale)``: rows divided by a power of two near their largest
    entry (:func:`~d2sm_loss.ops.reference.row_scale`; (..., 1)), then by their norm (any
    finite magnitude; 0 for an all-zero row)."""
    scale = row_scale(features)
    scaled = features / scale
    norms = torch.linalg.vector_norm(scaled, dim=-1)
    return scaled / norms.clamp_min(NORM_EPS).unsqueeze(-1), norms, scale


def _similarity_tile(unit_block: Tensor, unit_t: Tensor, similarity: str, temperature: float, out: Tensor) -> Tensor:
    """The (G, b, N) tile of the similarity for a block of unit rows against all rows, in ``out``.

    Cosine similarity: the similarity ``s = max((1 + c) / 2, 0) + COSINE_ETA`` itself. Softmax
    similarity: its logarithm ``(c - 1) / temperature``. One fused matmul-and-scale.
    """
    if similarity == "cosine":
        offset, scale = 0.5, 0.5
    else:
        offset, scale = -1.0 / temperature, 1.0 / temperature
    base = unit_block.new_full((1, 1, 1), offset).expand(out.shape)
    torch.baddbmm(base, unit_block, unit_t, beta=1.0, alpha=scale, out=out)
    if similarity == "cosine":
        # (1 + c) / 2 first, exact near c = -1 (0.5 + 0.5 c cancels without rounding), then
        # eta: adding 0.5 + eta in one step would round eta by ~1% in float32. The clamp:
        # rounding can push a cosine below -1 (see .reference).
        out.clamp_min_(0.0).add_(COSINE_ETA)
    return out


class _TileBuffers:
    """Three (G, b, N) work buffers allocated once per pass and reused for every block
    (views of their first G * rows * N elements for a shorter last block). Reusing them
    keeps the working set at exactly three tiles: no allocator churn or heap
    fragmentation from allocating and freeing a tile per operation and block."""

    def __init__(self, like: Tensor, groups: int, block: int, n: int):
        self.shape = (groups, block, n)
        self.flat = [like.new_empty(groups * block * n) for _ in range(3)]

    def get(self, rows: int) -> list[Tensor]:
        g, _, n = self.shape
        return [buf[: g * rows * n].view(g, rows, n) for buf in self.flat]


def _fill_block_diagonal(tile: Tensor, start: int, value: float) -> None:
    """Set the entries (i, start + i) of a (G, b, N) tile, i.e. j == i, to ``value``."""
    tile.diagonal(offset=start, dim1=-2, dim2=-1).fill_(value)


def _tile_pair(
    xh: Tensor, yh: Tensor, xh_t: Tensor, yh_t: Tensor, start: int, stop: int,
    similarity: str, temperature: float, include_self: bool, a: Tensor, b: Tensor,
) -> None:
    """Write the restored (``a``) and clean (``b``) similarity tiles of rows ``start:stop``:
    ``s`` (cosine) or ``log s`` (softmax), the diagonal masked out unless ``include_self``."""
    _similarity_tile(xh[:, start:stop], xh_t, similarity, temperature, out=a)
    _similarity_tile(yh[:, start:stop], yh_t, similarity, temperature, out=b)
    if not include_self:
        masked = -float("inf") if similarity == "softmax" else 0.0
        _fill_block_diagonal(a, start, masked)
        _fill_block_diagonal(b, start, masked)


def _log_normaliser(tile: Tensor, similarity: str, scratch: Tensor) -> Tensor:
    """Per-row ``log sum_j s`` of a tile holding ``s`` (cosine) or ``log s`` (softmax).

    The softmax branch is a logsumexp (row maximum subtracted before ``exp``) written
    with ``scratch`` as its work tile, so it allocates no tile of its own.
    """
    if similarity == "cosine":
        return tile.sum(dim=-1).log_()
    top = tile.amax(dim=-1, keepdim=True)
    torch.sub(tile, top, out=scratch).exp_()
    return scratch.sum(dim=-1).log_().add_(top.squeeze(-1))


class _StreamingSimilarityKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, similarity: str, temperature: float, include_self: bool, block_size: int):
        xh, x_norm, x_scale = _unit_rows(x.contiguous())
        yh, _, _ = _unit_rows(y.contiguous())
        xh_t, yh_t = xh.transpose(-1, -2), yh.transpose(-1, -2)
        groups, n, _ = x.shape
        log_zx = x.new_empty(groups, n)
        log_zy = x.new_empty(groups, n)
        kl = x.new_empty(groups, n)
        buffers = _TileBuffers(x, groups, min(block_size, n), n)
        for start in range(0, n, block_size):
            stop = min(n, start + block_size)
            a, b, scratch = buffers.get(stop - start)
            _tile_pair(xh, yh, xh_t, yh_t, start, stop, similarity, temperature, include_self, a, b)
            lzx = _log_normaliser(a, similarity, scratch)
            lzy = _log_normaliser(b, similarity, scratch)
            log_zx[:, start:stop] = lzx
            log_zy[:, start:stop] = lzy
            if similarity == "cosine":
                # px = s_x / Zx, py = s_y / Zy; a <- log(py / px), b <- py.
                a.mul_(torch.exp(-lzx).unsqueeze(-1))
                b.mul_(torch.exp(-lzy).unsqueeze(-1))
                torch.div(b, a, out=a)
                if not include_self:
                    _fill_block_diagonal(a, start, 1.0)  # 0 / 0 on the excluded diagonal
                a.log_()
            else:
                # a <- log py - log px, b <- py.
                a.sub_(lzx.unsqueeze(-1))
                b.sub_(lzy.unsqueeze(-1))
                torch.sub(b, a, out=a)
                if not include_self:
                    _fill_block_diagonal(a, start, 0.0)  # -inf - (-inf) on the excluded diagonal
                b.exp_()
            # Entries with py == 0 contribute 0 (0 * log 0 = 0), as in the reference.
            kl[:, start:stop] = a.mul_(b).sum(dim=-1)
            del a, b, scratch
        del buffers
        # The inputs themselves (no copies; the backward recomputes the unit rows): a
        # second-order backward needs the tensor the caller's graph continues from.
        ctx.save_for_backward(x, y, x_norm, x_scale, log_zx, log_zy)
        ctx.options = (similarity, temperature, include_self, block_size)
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        x, y, x_norm, x_scale, log_zx, log_zy = ctx.saved_tensors
        similarity, temperature, include_self, block_size = ctx.options
        if torch.is_grad_enabled():  # create_graph=True: a differentiable first derivative
            grad_x = similarity_kl_vjp(
                x, y, grad_kl, similarity=similarity, temperature=temperature, include_self=include_self
            )
            return grad_x, None, None, None, None, None
        # In the inputs' dtype, as the forward, even when backward is called inside autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _StreamingSimilarityKL._gradient(x, y, x_norm, x_scale, log_zx, log_zy, grad_kl, ctx.options)

    @staticmethod
    def _gradient(
        x: Tensor, y: Tensor, x_norm: Tensor, x_scale: Tensor, log_zx: Tensor, log_zy: Tensor, grad_kl: Tensor, options
    ):
        """The streamed first derivative ``dKL / dx`` (see the module docstring)."""
        similarity, temperature, include_self, block_size = options
        xh = (x.contiguous() / x_scale) / x_norm.clamp_min(NORM_EPS).unsqueeze(-1)  # as in the forward
        yh, _, _ = _unit_rows(y.contiguous())
        xh_t, yh_t = xh.transpose(-1, -2), yh.transpose(-1, -2)
        n = xh.shape[1]
        grad_kl = grad_kl.to(xh.dtype).contiguous()
        # Row factor g_i * dlog s/dc, with the constant part of dlog s/dc folded in:
        # cosine 1 / (2 s_ij) (the 1 / s_ij is applied on the tile), softmax 1 / tau.
        row_factor = grad_kl * (0.5 if similarity == "cosine" else 1.0 / temperature)
        inv_zx = torch.exp(-log_zx)
        inv_zy = torch.exp(-log_zy)
        grad_unit = torch.zeros_like(xh)
        buffers = _TileBuffers(xh, xh.shape[0], min(block_size, n), n)
        for start in range(0, n, block_size):
            stop = min(n, start + block_size)
            a, b, gm = buffers.get(stop - start)
            _tile_pair(xh, yh, xh_t, yh_t, start, stop, similarity, temperature, include_self, a, b)
            if similarity == "cosine":
                # Gm / (g_i / 2) = (px - py) / s_x, px = s_x / Zx, py = s_y / Zy.
                b.mul_(inv_zy[:, start:stop].unsqueeze(-1))
                torch.mul(a, inv_zx[:, start:stop].unsqueeze(-1), out=gm)
                gm.sub_(b)
                gm.div_(a)
                # At and beyond c = -1 (s held at COSINE_ETA) the derivative is 0, as the
                # reference's: an exactly antipodal pair's term is purely radial.
                gm.masked_fill_(a <= COSINE_ETA, 0.0)
                if not include_self:
                    _fill_block_diagonal(gm, start, 0.0)  # 0 / 0 on the excluded diagonal
            else:
                # Gm / (g_i / tau) = px - py, both from their logs.
                a.sub_(log_zx[:, start:stop].unsqueeze(-1)).exp_()
                b.sub_(log_zy[:, start:stop].unsqueeze(-1)).exp_()
                gm = a.sub_(b)
            del a, b
            # The row factor multiplies row i of Gm: apply it to the (G, b, D) products
            # instead of the (G, b, N) tile.
            scale = row_factor[:, start:stop].unsqueeze(-1)
            grad_unit[:, start:stop] += torch.bmm(gm, xh) * scale
            grad_unit.baddbmm_(gm.transpose(-1, -2), xh[:, start:stop] * scale)
            del gm
        del buffers
        # Through xh = (x / scale) / max(|x / scale|, NORM_EPS); the scale is a constant. Divided
        # in two steps: |x| itself may not be representable.
        big = (x_norm >= NORM_EPS).unsqueeze(-1)
        radial = (xh * grad_unit).sum(dim=-1, keepdim=True)
        grad_x = torch.where(big, grad_unit - xh * radial, grad_unit)
        grad_x = grad_x / x_norm.clamp_min(NORM_EPS).unsqueeze(-1) / x_scale
        return grad_x, None, None, None, None, None


def similarity_kl_streaming(
    x: Tensor,
    y: Tensor,
    *,
    similarity: str,
    temperature: float,
    include_self: bool,
    block_size: int | None = None,
) -> Tensor:
    """Per-row ``KL(p_clean(. | i) || p_restored(. | i))`` without N x N matrices.

    Same statistic and contract as
    :func:`d2sm_loss.ops.reference.similarity_kl_reference`: ``x`` (restored, receives
    the gradient) and ``y`` (clean, a constant) of shape (G, N, D), float32 or float64;
    returns (G, N) in that dtype.

    Args:
        block_size: rows per block. ``None`` picks ``b`` so that one (G, b, N) tile holds
            about :data:`TILE_ELEMENTS` (2**20) values on the CPU, :data:`TILE_ELEMENTS_GPU`
            (2**24) on other devices. Any positive integer works,
            including ones that do not divide N; larger is not always faster.

    Memory: saved for backward the inputs (references) and ``3 G N`` values; peak
    transient three ``G b N``-value tile buffers plus O(G N D) (recomputed unit rows, the
    gradient accumulator). The reference needs several (G, N, N) matrices.

    Second derivatives (``create_graph=True``) are supported and equal the reference's:
    that backward evaluates the reference (:func:`d2sm_loss.ops.reference.similarity_kl_vjp`)
    and so costs its O(G N^2) memory.

    FLOPs per group: forward ``4 N^2 D`` (two similarity tiles per block), backward
    ``8 N^2 D`` (recomputed tiles, ``Gm Xh`` and ``Gm^T Xh``), plus ``O(N^2)``
    elementwise operations in each.
    """
    if x.dim() != 3 or x.shape != y.shape:
        raise ValueError(f"x and y must both have shape (G, N, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if x.dtype not in (torch.float32, torch.float64) or y.dtype != x.dtype:
        raise TypeError(f"x and y must both be float32 or both float64, got {x.dtype} and {y.dtype}")
    groups, n, _ = x.shape
    if block_size is None:
        block_size = default_block_size(groups, n, TILE_ELEMENTS if x.device.type == "cpu" else TILE_ELEMENTS_GPU)
    elif int(block_size) < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return _StreamingSimilarityKL.apply(
        x, y.detach(), similarity, float(temperature), bool(include_self), int(block_size)
    )

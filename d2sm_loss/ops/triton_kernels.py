"""Fused Triton kernels for the similarity-KL statistic (forward and backward).

The statistic is the one :mod:`.reference` defines. Both kernels stream over tiles of
``BLOCK_M`` rows and ``BLOCK_N`` columns (``_similarity_tile``), so nothing of size
N x N is stored: the forward keeps online log-sum-exp accumulators per row and saves O(N)
statistics; the backward recomputes the tiles and uses the symmetry of the similarity
matrices to accumulate both gradient terms in one pass, without atomics. Cost per group:
``4 N^2 D`` FLOPs forward, ``(4 ceil(D / BLOCK_DOUT) + 2) N^2 D`` backward; memory O(N D).
Accumulation in float32 (float64 for float64 inputs); float32 tiles use exact products
unless PyTorch's TF32 switch is on. A backward under ``create_graph=True`` returns the
reference's differentiable gradient (:func:`~d2sm_loss.ops.reference.similarity_kl_vjp`).
Launch configurations: :mod:`.triton_config`. With ``TRITON_INTERPRET=1`` set before import
the kernels run on CPU tensors through the Triton interpreter. The algorithm, FLOP count and
precision rules in detail: :doc:`/guides/granularity-kernels-memory`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import COSINE_ETA, NORM_EPS, SIMILARITIES, row_scale, similarity_kl_vjp
from .triton_config import _accumulation_dtype, _dot_native, _dot_precision, choose_block_config

__all__ = ["similarity_kl_triton"]

# A finite "minus infinity" to start the running maxima: exp(_NEG_INIT - m) is 0 for every
# real m, and exp(_NEG_INIT - _NEG_INIT) is 1 instead of NaN.
_NEG_INIT = -1.0e30


# --------------------------------------------------------------------------------------
# Triton device functions
# --------------------------------------------------------------------------------------


@triton.jit
def _log_similarity(c, COSINE: tl.constexpr, eta, temperature):
    """``log s(c)``: ``log(max((1 + c)/2, 0) + eta)`` (cosine; the max guards against a
    rounded cosine below -1, see :mod:`.reference`) or ``(c - 1)/temperature`` (softmax)."""
    if COSINE:
        half = (1.0 + c) * 0.5
        # where(half <= 0) rather than maximum(half, 0), which returns 0 for a NaN half on GPUs.
        return tl.log(tl.where(half <= 0.0, 0.0, half) + eta)
    else:
        return (c - 1.0) / temperature


@triton.jit
def _similarity_tile(
    X, Y, RINV_X, RINV_Y, base, stat_base, rows, row_ok, rinv_xi, rinv_yi, col_start, N, D, eta, temperature,
    ACC: tl.constexpr,
    COSINE: tl.constexpr,
    INCLUDE_SELF: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The (rows, columns ``col_start:col_start + BLOCK_N``) tile both kernels stream over.

    Computes ``x_i . x_j`` and ``y_i . y_j`` with ``tl.dot`` (looping over D in
    ``BLOCK_K`` chunks), scales them by the reciprocal norms into the cosines ``c_ij`` and
    ``d_ij``, and takes ``log s`` of both. Returns ``(cols, col_ok, rinv_xj, c, lx, ly,
    valid)``: the column indices and which exist, the columns' reciprocal norms, the
    restored cosines, ``lx = log s(c)`` and ``ly = log s(d)`` on every entry, and
    ``valid``, which pairs take part (real columns, minus the diagonal unless
    ``INCLUDE_SELF``). Masking ``lx``, ``ly`` with ``valid`` is left to the caller.
    """
    cols = col_start + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dot_x = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    dot_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    row_off = rows[:, None].to(tl.int64) * D
    col_off = cols[None, :].to(tl.int64) * D
    for k_start in range(0, D, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & col_ok[None, :]
        a_off = base + row_off + ks[None, :]  # (BLOCK_M, BLOCK_K)
        b_off = base + col_off + ks[:, None]  # (BLOCK_K, BLOCK_N): the column rows, transposed
        xa = tl.load(X + a_off, mask=a_mask, other=0.0)
        xb = tl.load(X + b_off, mask=b_mask, other=0.0)
        ya = tl.load(Y + a_off, mask=a_mask, other=0.0)
        yb = tl.load(Y + b_off, mask=b_mask, other=0.0)
        if not DOT_NATIVE:
            xa = xa.to(ACC)
            xb = xb.to(ACC)
            ya = ya.to(ACC)
            yb = yb.to(ACC)
        dot_x = tl.dot(xa, xb, dot_x, input_precision=PRECISION, out_dtype=ACC)
        dot_y = tl.dot(ya, yb, dot_y, input_precision=PRECISION, out_dtype=ACC)
    rinv_xj = tl.load(RINV_X + stat_base + cols, mask=col_ok, other=1.0)
    rinv_yj = tl.load(RINV_Y + stat_base + cols, mask=col_ok, other=1.0)
    c = dot_x * rinv_xi[:, None] * rinv_xj[None, :]
    d = dot_y * rinv_yi[:, None] * rinv_yj[None, :]
    valid = col_ok[None, :] & (rows[:, None] >= 0)  # (rows >= 0 broadcasts to the tile)
    if not INCLUDE_SELF:
        valid = valid & (rows[:, None] != cols[None, :])
    lx = _log_similarity(c, COSINE, eta, temperature)
    ly = _log_similarity(d, COSINE, eta, temperature)
    return cols, col_ok, rinv_xj, c, lx, ly, valid


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _similarity_kl_fwd_kernel(
    X, Y, RINV_X, RINV_Y, KL, LOG_ZX, LOG_ZY, N, D,
    TEMPERATURE: tl.constexpr,
    ETA: tl.constexpr,
    NEG_INIT: tl.constexpr,
    COSINE: tl.constexpr,
    INCLUDE_SELF: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per-row KL, log Zx and log Zy for one (row block, group) (the algorithm: the kernels guide).

    ``X``, ``Y``: contiguous (G, N, D) features; ``RINV_*``: (G, N) reciprocal clamped
    norms; outputs (G, N) in the accumulation dtype (that of ``KL``).
    """
    ACC: tl.constexpr = KL.dtype.element_ty
    # Constants built directly in the accumulation dtype (a bare Python float would be
    # rounded to float32 first, which float64 gradcheck would notice).
    eta = tl.full([], ETA, ACC)
    temperature = tl.full([], TEMPERATURE, ACC)
    neg_inf = tl.full([], float("-inf"), ACC)

    pid_m = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    base = group * N * D
    stat_base = group * N

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rinv_xi = tl.load(RINV_X + stat_base + rows, mask=row_ok, other=1.0)
    rinv_yi = tl.load(RINV_Y + stat_base + rows, mask=row_ok, other=1.0)

    max_x = tl.full((BLOCK_M,), NEG_INIT, ACC)  # running max of lx over the columns seen
    sum_x = tl.zeros((BLOCK_M,), dtype=ACC)  # sum_j exp(lx_ij - max_x)
    max_y = tl.full((BLOCK_M,), NEG_INIT, ACC)
    sum_y = tl.zeros((BLOCK_M,), dtype=ACC)  # sum_j exp(ly_ij - max_y)
    cross = tl.zeros((BLOCK_M,), dtype=ACC)  # sum_j exp(ly_ij - max_y) (ly_ij - lx_ij)

    for col_start in range(0, N, BLOCK_N):
        _, _, _, _, lx_all, ly_all, valid = _similarity_tile(
            X, Y, RINV_X, RINV_Y, base, stat_base, rows, row_ok, rinv_xi, rinv_yi, col_start, N, D, eta,
            temperature, ACC, COSINE, INCLUDE_SELF, DOT_NATIVE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        lx = tl.where(valid, lx_all, neg_inf)
        ly = tl.where(valid, ly_all, neg_inf)

        new_max_x = tl.maximum(max_x, tl.max(lx, axis=1))
        sum_x = sum_x * tl.exp(max_x - new_max_x) + tl.sum(tl.exp(lx - new_max_x[:, None]), axis=1)
        max_x = new_max_x

        new_max_y = tl.maximum(max_y, tl.max(ly, axis=1))
        rescale_y = tl.exp(max_y - new_max_y)
        weight_y = tl.exp(ly - new_max_y[:, None])  # 0 on excluded pairs
        gap = tl.where(valid, ly_all - lx_all, 0.0)  # finite everywhere, 0 off the support
        sum_y = sum_y * rescale_y + tl.sum(weight_y, axis=1)
        cross = cross * rescale_y + tl.sum(weight_y * gap, axis=1)
        max_y = new_max_y

    log_zx = max_x + tl.log(sum_x)
    log_zy = max_y + tl.log(sum_y)
    # KL = cross / sum_y - log Zy + log Zx, with the two log Z differenced before their
    # (possibly large, nearly equal) running maxima are added back: float32 error ~eps, not
    # ~eps * |log Z|.
    kl = cross / sum_y + (max_x - max_y) + tl.log(sum_x / sum_y)
    tl.store(KL + stat_base + rows, kl, mask=row_ok)
    tl.store(LOG_ZX + stat_base + rows, log_zx, mask=row_ok)
    tl.store(LOG_ZY + stat_base + rows, log_zy, mask=row_ok)


@triton.jit
def _similarity_kl_bwd_kernel(
    X, Y, RINV_X, RINV_Y, PROJECT_X, LOG_ZX, LOG_ZY, GRAD, DX, N, D,
    TEMPERATURE: tl.constexpr,
    ETA: tl.constexpr,
    COSINE: tl.constexpr,
    INCLUDE_SELF: tl.constexpr,
    DOT_NATIVE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
):
    """``dKL/dX`` for one (row block, group, chunk of D columns) (the kernels guide).

    ``PROJECT_X``: (G, N) 1 where ``|x_i| >= NORM_EPS`` (the normalisation's projection
    applies), else 0. ``GRAD``: (G, N) incoming gradient. ``DX``: (G, N, D) output in the
    accumulation dtype.
    """
    ACC: tl.constexpr = DX.dtype.element_ty
    eta = tl.full([], ETA, ACC)
    temperature = tl.full([], TEMPERATURE, ACC)
    neg_inf = tl.full([], float("-inf"), ACC)

    pid_m = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    base = group * N * D
    stat_base = group * N

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    out_cols = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    out_ok = out_cols < D

    rinv_xk = tl.load(RINV_X + stat_base + rows, mask=row_ok, other=1.0)
    rinv_yk = tl.load(RINV_Y + stat_base + rows, mask=row_ok, other=1.0)
    log_zx_k = tl.load(LOG_ZX + stat_base + rows, mask=row_ok, other=0.0)
    log_zy_k = tl.load(LOG_ZY + stat_base + rows, mask=row_ok, other=0.0)
    grad_k = tl.load(GRAD + stat_base + rows, mask=row_ok, other=0.0)

    dxh = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=ACC)  # sum_j H_kj xh_j, this chunk of D
    radial = tl.zeros((BLOCK_M,), dtype=ACC)  # xh_k . dxh_k = sum_j H_kj c_kj

    for col_start in range(0, N, BLOCK_N):
        cols, col_ok, rinv_xj, c, lx_all, ly_all, valid = _similarity_tile(
            X, Y, RINV_X, RINV_Y, base, stat_base, rows, row_ok, rinv_xk, rinv_yk, col_start, N, D, eta,
            temperature, ACC, COSINE, INCLUDE_SELF, DOT_NATIVE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        log_zx_j = tl.load(LOG_ZX + stat_base + cols, mask=col_ok, other=0.0)
        log_zy_j = tl.load(LOG_ZY + stat_base + cols, mask=col_ok, other=0.0)
        grad_j = tl.load(GRAD + stat_base + cols, mask=col_ok, other=0.0)
        lx = tl.where(valid, lx_all, neg_inf)
        ly = tl.where(valid, ly_all, neg_inf)

        # Row k's own term (p(j | k)) and row j's term seen from the column side (p(k | j)).
        own = grad_k[:, None] * (tl.exp(lx - log_zx_k[:, None]) - tl.exp(ly - log_zy_k[:, None]))
        mirrored = grad_j[None, :] * (tl.exp(lx - log_zx_j[None, :]) - tl.exp(ly - log_zy_j[None, :]))
        if COSINE:
            # Zero at and beyond c = -1, as the reference: an exactly antipodal pair's
            # derivative is radial (u_j = -u_k) and the projection below removes it exactly.
            half = (1.0 + c) * 0.5
            dlog_dc = tl.where(half <= 0.0, 0.0, 0.5 / (half + eta))  # a NaN half stays NaN (no maximum)
        else:
            dlog_dc = 1.0 / temperature
        h = tl.where(valid, (own + mirrored) * dlog_dc, 0.0)
        radial += tl.sum(h * c, axis=1)

        xj_out = tl.load(
            X + base + cols[:, None].to(tl.int64) * D + out_cols[None, :],
            mask=col_ok[:, None] & out_ok[None, :],
            other=0.0,
        ).to(ACC)
        dxh = tl.dot(h * rinv_xj[None, :], xj_out, dxh, input_precision=PRECISION, out_dtype=ACC)

    xk = tl.load(
        X + base + rows[:, None].to(tl.int64) * D + out_cols[None, :],
        mask=row_ok[:, None] & out_ok[None, :],
        other=0.0,
    ).to(ACC)
    project_k = tl.load(PROJECT_X + stat_base + rows, mask=row_ok, other=0.0)
    # dx_k = rinv_k (dxh_k - xh_k (xh_k . dxh_k)) with xh_k = x_k rinv_k.
    dx = rinv_xk[:, None] * (dxh - (project_k * radial * rinv_xk)[:, None] * xk)
    tl.store(
        DX + base + rows[:, None].to(tl.int64) * D + out_cols[None, :],
        dx,
        mask=row_ok[:, None] & out_ok[None, :],
    )


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _scaled(features: Tensor) -> tuple[Tensor, Tensor]:
    """The rows divided by a power of two near their largest entry (exact; any finite
    magnitude then has a representable norm and products) and that scale, (G, N, 1)."""
    scale = row_scale(features)
    return (features / scale).contiguous(), scale


def _reciprocal_norms(features: Tensor, acc_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``1 / max(|f_i|, NORM_EPS)`` and the norms themselves, shape (G, N), ``acc_dtype``,
    of rows already scaled by :func:`_scaled` (nonzero rows have norm >= 1)."""
    norms = torch.linalg.vector_norm(features, dim=-1, dtype=acc_dtype)
    return norms.clamp_min(NORM_EPS).reciprocal(), norms


class _SimilarityKLFunction(torch.autograd.Function):
    """Autograd wrapper: fused forward kernel, fused backward kernel (gradient for x only).

    With gradient recording on in the backward (``create_graph=True``) the gradient comes
    from :func:`d2sm_loss.ops.reference.similarity_kl_vjp` instead, differentiable in the
    saved input ``x`` and the incoming gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, y: Tensor, similarity: str, temperature: float, include_self: bool, precision: str
    ) -> Tensor:
        x_in = x  # saved as given: a second-order backward continues the caller's graph from it
        with torch.no_grad():
            x, x_scale = _scaled(x)
            y, _ = _scaled(y.detach())
        groups, n, d = x.shape
        acc_dtype = _accumulation_dtype(x.dtype)
        config = choose_block_config(d, x.dtype).forward
        dot_native = _dot_native(x.dtype)
        with torch.no_grad():
            rinv_x, norms_x = _reciprocal_norms(x, acc_dtype)
            rinv_y, _ = _reciprocal_norms(y, acc_dtype)
        kl = torch.empty((groups, n), dtype=acc_dtype, device=x.device)
        log_zx = torch.empty_like(kl)
        log_zy = torch.empty_like(kl)
        grid = (triton.cdiv(n, config.block_m), groups)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _similarity_kl_fwd_kernel[grid](
                x, y, rinv_x, rinv_y, kl, log_zx, log_zy, n, d,
                TEMPERATURE=float(temperature),
                ETA=COSINE_ETA,
                NEG_INIT=_NEG_INIT,
                COSINE=similarity == "cosine",
                INCLUDE_SELF=bool(include_self),
                DOT_NATIVE=dot_native,
                PRECISION=precision,
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                BLOCK_K=config.block_k,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        # >= as autograd differentiates the reference's clamp_min (the tie passes through).
        project_x = (norms_x >= NORM_EPS).to(acc_dtype)
        ctx.save_for_backward(x_in, y, x_scale, rinv_x, rinv_y, project_x, log_zx, log_zy)
        ctx.similarity = similarity
        ctx.temperature = float(temperature)
        ctx.include_self = bool(include_self)
        ctx.precision = precision
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        x, y, x_scale, rinv_x, rinv_y, project_x, log_zx, log_zy = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable first derivative
            grad_x = similarity_kl_vjp(
                x, y, grad_kl, similarity=ctx.similarity, temperature=ctx.temperature, include_self=ctx.include_self
            )
            return grad_x, None, None, None, None, None
        x = (x / x_scale).contiguous()  # the scaled rows of the forward (y was saved scaled)
        groups, n, d = x.shape
        acc_dtype = rinv_x.dtype
        config = choose_block_config(d, x.dtype).backward
        grad = grad_kl.to(acc_dtype).contiguous()
        dx = torch.empty((groups, n, d), dtype=acc_dtype, device=x.device)
        grid = (triton.cdiv(n, config.block_m), groups, triton.cdiv(d, config.block_dout))
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _similarity_kl_bwd_kernel[grid](
                x, y, rinv_x, rinv_y, project_x, log_zx, log_zy, grad, dx, n, d,
                TEMPERATURE=ctx.temperature,
                ETA=COSINE_ETA,
                COSINE=ctx.similarity == "cosine",
                INCLUDE_SELF=ctx.include_self,
                DOT_NATIVE=_dot_native(x.dtype),
                PRECISION=ctx.precision,
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                BLOCK_K=config.block_k,
                BLOCK_DOUT=config.block_dout,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        # dx above is the derivative with respect to the scaled rows x / scale.
        return (dx / x_scale.to(acc_dtype)).to(x.dtype), None, None, None, None, None


def similarity_kl_triton(
    x: Tensor,
    y: Tensor,
    *,
    similarity: str,
    temperature: float,
    include_self: bool,
    allow_tf32: bool | None = None,
) -> Tensor:
    """Per-row ``KL(p_clean(. | i) || p_restored(. | i))`` with the fused Triton kernels.

    Args:
        x: restored features, shape (G, N, D), float16, bfloat16, float32 or float64, on a
            CUDA device (or on the CPU with ``TRITON_INTERPRET=1`` set before import).
            Receives the gradient.
        y: clean features, same shape and device; treated as a constant. ``x`` and ``y``
            are both cast to their promoted dtype (float16 restored features with float32
            clean ones run in float32).
        similarity: ``"cosine"`` or ``"softmax"``.
        temperature: temperature of the softmax similarity (unused by the cosine similarity; it is a
            compile-time constant, so each new value compiles the kernels once).
        include_self: whether ``j = i`` takes part in each row's distribution.
        allow_tf32: float32 tile products in TF32 (``True``) or exact (``False``); None
            follows PyTorch's setting (``d2sm_loss._compat.tf32_allowed()``). Ignored for other dtypes.

    Returns:
        Shape (G, N), float32 (float64 for float64 inputs); equal to
        :func:`d2sm_loss.ops.reference.similarity_kl_reference` up to rounding.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if x.dim() != 3 or x.shape != y.shape:
        raise ValueError(f"x and y must both have shape (G, N, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = x.to(dtype), y.to(dtype)
    if similarity == "cosine":
        temperature = 1.0  # unused: keep one compiled variant for every temperature
    precision = _dot_precision(dtype, allow_tf32)
    return _SimilarityKLFunction.apply(x, y, similarity, float(temperature), bool(include_self), precision)

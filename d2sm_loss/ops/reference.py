"""The similarity-KL statistic written plainly, with full N x N matrices.

The statistic compares the similarity structure of two sets of N feature vectors: the
restored features ``x_1..x_N`` and the clean features ``y_1..y_N`` (rows of (N, D)
matrices, one such pair per group). Each row is normalised, the cosine similarities of
every pair of rows are mapped to positive similarities, and row i's similarities,
normalised to sum to one, are a distribution over the other rows ``j``::

    xh_i = x_i / |x_i|   (0 for an all-zero row)
    c_ij = xh_i . xh_j                 d_ij = yh_i . yh_j
    log s(c) = log(max((1 + c) / 2, 0) + COSINE_ETA)   similarity "cosine"
    log s(c) = (c - 1) / temperature                     similarity "softmax"
    p_restored(j | i) = s(c_ij) / sum_j s(c_ij)         p_clean(j | i) likewise from d
    KL_i = KL(p_clean(. | i) || p_restored(. | i))
         = sum_j p_clean(j | i) (log p_clean(j | i) - log p_restored(j | i))

with j over all rows, or over j != i when ``include_self`` is False. ``KL_i >= 0``, with
equality when the two similarity structures agree. The clean side is a constant: its
gradient is never computed.

Any finite magnitude: each row is first divided by a power of two near its largest entry
(:func:`row_scale`, exact in floating point, no autograd graph), then by its norm, so rows
of 1e30 or 1e-30 (float32) neither overflow nor underflow to a zero norm: the statistic is
scale-invariant per row, as the cosine is. Only an all-zero row keeps the fallback
``x / max(|x|, NORM_EPS)``: it gets ``xh = 0`` (cosine 0 with every row), a finite value
and the gradient ``dxh / NORM_EPS``. A nonzero row's gradient is the exact derivative of
``x / |x|``, of order ``1 / |x_i|``.

Conditioning: ``d log s / dc = 1 / (2 s)`` reaches ``1 / (2 COSINE_ETA)`` at ``c = -1``,
so near exactly antipodal rows a cosine rounded by ``~1e-7`` (float32) moves their
gradient entries by a few per cent (values by ~1e-7); float64 agrees with exact arithmetic
to ~1e-11 there. Every path computes ``(1 + c) / 2`` before adding ``COSINE_ETA``, so none
adds a rounding of its own.

The ``max(., 0)`` guards against rounding: a cosine of unit vectors is never below
-1, but a computed one can be (by ~1e-7 in float32, ~1e-3 with TF32 or float16
products), and below ``-1 - 2 COSINE_ETA`` the logarithm would be NaN. At and beyond
``c = -1`` every path takes the derivative of ``log s`` as 0: at exactly antipodal rows
the pair's term in the gradient is radial (``xh_j = -xh_i``) and vanishes after the
normalisation's projection, exactly so; keeping its large factor ``1 / (2 COSINE_ETA)``
would only leave rounding behind.

Memory is O(N^2) per group (several (G, N, N) matrices, kept for the backward); the
streaming and Triton implementations compute the same numbers without them. They use
:func:`similarity_kl_vjp` for second derivatives.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "COSINE_ETA",
    "NORM_EPS",
    "SIMILARITIES",
    "kl_from_log_conditionals",
    "log_conditionals",
    "log_similarity",
    "row_scale",
    "similarity_kl_reference",
    "similarity_kl_vjp",
]

#: Added to the cosine similarity's similarity so that ``log s`` stays finite at c = -1.
COSINE_ETA = 1e-6
#: After :func:`row_scale` every nonzero row has norm >= 1: only an all-zero row is divided
#: by this instead of its norm (a finite value and gradient instead of NaN).
NORM_EPS = 1e-6
#: The similarity kernels.
SIMILARITIES = ("cosine", "softmax")


def log_similarity(cos: Tensor, similarity: str, temperature: float) -> Tensor:
    """``log s(c)`` for a tensor of cosine similarities ``cos``."""
    if similarity == "cosine":
        half = (1.0 + cos) * 0.5
        # Held at 0 at and beyond c = -1, with derivative 0 there (where(), not clamp, whose
        # derivative at the tie is 1): an exactly antipodal pair's derivative is radial.
        # Tested as half <= 0, so that a NaN cosine stays NaN instead of becoming log(eta).
        return torch.log(torch.where(half <= 0.0, torch.zeros_like(half), half) + COSINE_ETA)
    if similarity == "softmax":
        return (cos - 1.0) / temperature
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def row_scale(features: Tensor) -> Tensor:
    """A power of two near each row's largest magnitude, shape (..., 1), dtype of
    ``features``, without a graph; 1 for an all-zero row.

    ``features / row_scale(features)`` has its largest entry in [1, 2) per row and is exact
    (a power of two only shifts exponents), so its norm neither overflows nor underflows
    for any finite input. Dividing by it leaves ``x / |x|`` and its derivative unchanged.
    Written with ``log2`` / ``floor`` / ``exp2`` (no ``frexp``) for :func:`torch.compile`.
    """
    with torch.no_grad():
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        top = features.detach().abs().amax(dim=-1, keepdim=True).to(acc)
        scale = torch.exp2(torch.floor(torch.log2(top)))
        return torch.where(top > 0, scale, torch.ones_like(scale)).to(features.dtype)


def unit_rows(features: Tensor) -> Tensor:
    """``features / |row|`` per row at any finite magnitude (0 for an all-zero row),
    differentiable (see the module docstring)."""
    scaled = features / row_scale(features)
    return scaled / _row_norms(scaled).clamp_min(NORM_EPS)


def _row_norms(features: Tensor) -> Tensor:
    """``|f_i|`` of each row, shape (..., 1), with finite derivatives of every order.

    The norm's own derivative ``f / |f|`` is 0 / 0 at an all-zero row; autograd's first
    derivative special-cases it but the second is NaN there. Such rows take the norm of a
    row of ones instead, set back to 0 (no gradient reaches them through the norm: it is
    clamped to ``NORM_EPS`` anyway). Other rows are untouched.
    """
    zero = (features == 0).all(dim=-1, keepdim=True)
    safe = torch.where(zero, torch.ones_like(features), features)
    return torch.linalg.vector_norm(safe, dim=-1, keepdim=True).masked_fill(zero, 0.0)


def log_conditionals(logits: Tensor, columns: Tensor | None = None) -> Tensor:
    """``log p(j | i)``: the log-softmax of ``logits`` (``log s``, (..., N, M)) over the
    columns ``j`` where ``columns`` (a bool mask broadcasting to them; None: all) is True,
    ``-inf`` elsewhere. A row without columns gets finite dummies, which
    :func:`kl_from_log_conditionals` then counts as 0."""
    if columns is not None:
        keep = columns | ~columns.any(dim=-1, keepdim=True)
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def kl_from_log_conditionals(log_px: Tensor, log_py: Tensor, columns: Tensor | None = None) -> Tensor:
    """Per-row ``KL(p_y(. | i) || p_x(. | i)) = sum_j p_y (log p_y - log p_x)`` over the last
    dimension, from log-conditionals (:func:`log_conditionals`; ``log_py`` without a graph).
    Terms where ``p_y`` is 0 or outside ``columns`` count 0 (``0 log 0 = 0``) and send no
    gradient, so masked ``-inf`` entries never meet (no ``inf - inf``)."""
    py = log_py.exp()
    keep = py != 0 if columns is None else columns & (py != 0)
    diff = torch.where(keep, log_py - torch.where(keep, log_px, 0.0), 0.0)
    return (torch.where(keep, py, 0.0) * diff).sum(dim=-1)


def _log_conditional(features: Tensor, similarity: str, temperature: float, include_self: bool) -> Tensor:
    """``log p(j | i)`` for every pair of rows of ``features`` (G, N, D) -> (G, N, N)."""
    unit = unit_rows(features)
    logits = log_similarity(unit @ unit.transpose(-1, -2), similarity, temperature)
    off_diagonal = None if include_self else ~torch.eye(features.shape[-2], dtype=torch.bool, device=features.device)
    return log_conditionals(logits, off_diagonal)


def similarity_kl_reference(
    x: Tensor,
    y: Tensor,
    *,
    similarity: str = "cosine",
    temperature: float = 0.1,
    include_self: bool = True,
) -> Tensor:
    """Per-row ``KL(p_clean(. | i) || p_restored(. | i))`` for ``x``, ``y`` of shape (G, N, D).

    Returns a tensor of shape (G, N) in the dtype of ``x``. The gradient flows into
    ``x`` only; ``y`` is treated as a constant. Built from ordinary differentiable torch
    operations, so derivatives of every order exist. Memory O(G N^2).
    """
    log_px = _log_conditional(x, similarity, temperature, include_self)
    with torch.no_grad():
        log_py = _log_conditional(y.detach(), similarity, temperature, include_self)
    return kl_from_log_conditionals(log_px, log_py)


def similarity_kl_vjp(
    x: Tensor,
    y: Tensor,
    grad_kl: Tensor,
    *,
    similarity: str,
    temperature: float,
    include_self: bool,
) -> Tensor:
    """``sum_{g,i} grad_kl[g, i] * dKL[g, i] / dx`` as a differentiable function of ``x``
    and ``grad_kl``: the first derivative, with a graph for the second.

    The streaming and Triton implementations return this from their backward pass when
    it runs with gradient recording on (``torch.autograd.grad(..., create_graph=True)``),
    so their second derivatives are exactly the reference's; an ordinary backward keeps
    their fused, O(N D)-memory path. ``x`` is the tensor the caller's graph continues
    from (the implementation's own input, saved for backward), ``y`` a constant.

    The statistic is evaluated with :func:`similarity_kl_reference` in float32 (float64
    for float64 ``x``), whatever the dtype of ``x`` and any enclosing :func:`torch.autocast`
    region; the result has the dtype of ``x``.
    Cost: the reference's forward and backward, O(G N^2 D) FLOPs and O(G N^2) memory,
    and the graph built here holds several (G, N, N) matrices until the second backward
    has run.
    """
    if not x.requires_grad:
        raise ValueError("x must require grad: the first derivative is taken with respect to it")
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Outside any autocast region, as the forward passes run: a backward called inside one
    # would otherwise recompute the similarities in bfloat16 / float16.
    with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        kl = similarity_kl_reference(
            x.to(acc_dtype), y.detach().to(acc_dtype),
            similarity=similarity, temperature=temperature, include_self=include_self,
        )
        (grad_x,) = torch.autograd.grad(kl, x, grad_kl.to(acc_dtype), create_graph=True)
    return grad_x

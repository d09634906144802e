"""The similarity-KL statistic written plainly, with full N x N matrices.

This is the readable definition (``../shared/METHOD.md`` in the project notes):

    xh_i = x_i / max(|x_i|, NORM_EPS)
    c_ij = xh_i . xh_j                 d_ij = yh_i . yh_j
    log s(c) = log(max((1 + c) / 2, 0) + COSINE_ETA)   kernel "cosine"
    log s(c) = (c - 1) / temperature              kernel "softmax"
    p_restored(j | i) = s(c_ij) / sum_j s(c_ij)   p_clean(j | i) likewise from d
    KL_i = KL(p_clean(. | i) || p_restored(. | i))

with j over all rows, or over j != i when ``include_self`` is False. The clean side is a
constant: its gradient is never computed. The ``max(., 0)`` only guards against rounding:
a cosine of unit vectors is never below -1, but a computed one can be (by ~1e-7 in
float32, ~1e-3 with TF32 or float16 products), and below ``-1 - 2 COSINE_ETA`` the
logarithm would be NaN. The streaming and Triton paths hold the similarity at the same
bound (giving such entries the derivative at the bound, where autograd of ``clamp`` here
gives 0: the two differ only on entries that exact arithmetic cannot produce). Memory is O(N^2) per group; the streaming and
Triton implementations compute the same numbers without the N x N matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["COSINE_ETA", "NORM_EPS", "KERNELS", "log_similarity", "similarity_kl_reference"]

#: Added to the cosine kernel's similarity so that ``log s`` stays finite at c = -1.
COSINE_ETA = 1e-6
#: Rows shorter than this are divided by it instead of their norm (an all-zero row
#: gets a finite value and gradient instead of NaN).
NORM_EPS = 1e-6
#: The similarity kernels.
KERNELS = ("cosine", "softmax")


def log_similarity(cos: Tensor, kernel: str, temperature: float) -> Tensor:
    """``log s(c)`` for a tensor of cosine similarities ``cos``."""
    if kernel == "cosine":
        return torch.log(((1.0 + cos) * 0.5).clamp_min(0.0) + COSINE_ETA)
    if kernel == "softmax":
        return (cos - 1.0) / temperature
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _log_conditional(features: Tensor, kernel: str, temperature: float, include_self: bool) -> Tensor:
    """``log p(j | i)`` for every pair of rows of ``features`` (G, N, D) -> (G, N, N)."""
    unit = features / features.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    logits = log_similarity(unit @ unit.transpose(-1, -2), kernel, temperature)
    if not include_self:
        eye = torch.eye(features.shape[-2], dtype=torch.bool, device=features.device)
        logits = logits.masked_fill(eye, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def similarity_kl_reference(
    x: Tensor,
    y: Tensor,
    *,
    kernel: str = "cosine",
    temperature: float = 0.1,
    include_self: bool = True,
) -> Tensor:
    """Per-row ``KL(p_clean(. | i) || p_restored(. | i))`` for ``x``, ``y`` of shape (G, N, D).

    Returns a tensor of shape (G, N) in the dtype of ``x``. The gradient flows into
    ``x`` only; ``y`` is treated as a constant.
    """
    log_px = _log_conditional(x, kernel, temperature, include_self)
    with torch.no_grad():
        log_py = _log_conditional(y.detach(), kernel, temperature, include_self)
        py = log_py.exp()
        if not include_self:
            # 0 * log 0 is 0: keep the masked diagonal out of the sum instead of -inf * 0.
            log_py = log_py.masked_fill(py == 0, 0.0)
    diff = (log_py - log_px).masked_fill(py == 0, 0.0)
    return (py * diff).sum(dim=-1)

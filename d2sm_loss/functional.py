"""Functional form of the D2SM statistic: :func:`similarity_kl`.

This is the single entry point to the math; :class:`d2sm_loss.SemanticStatisticsLoss`
calls it. It validates its arguments once, chooses an implementation from
:mod:`d2sm_loss.ops` and applies the reduction.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from ._compat import triton_interpreted
from .checks import check_bool, check_choice, check_number, check_pair
from .ops.reference import KERNELS as SIMILARITIES
from .ops.reference import similarity_kl_reference

__all__ = [
    "similarity_kl",
    "resolve_implementation",
    "IMPLEMENTATIONS",
    "REDUCTIONS",
    "SIMILARITIES",
    "TRITON_AUTO_MAX_FEATURES",
]

#: The similarity function of the statistic's distributions.
Similarity = Literal["cosine", "softmax"]
#: How the per-row values are reduced.
Reduction = Literal["mean", "sum", "none"]
#: Which implementation computes the statistic.
Implementation = Literal["auto", "triton", "streaming", "reference"]

#: ``"streaming"`` is the streaming PyTorch path (O(N) memory), ``"reference"`` the plain
#: O(N^2) one, ``"triton"`` the fused kernels.
IMPLEMENTATIONS = ("auto", "triton", "streaming", "reference")
REDUCTIONS = ("mean", "sum", "none")

#: ``implementation="auto"`` uses the Triton kernels only for rows of at most this many
#: features. Beyond it their backward keeps 128 gradient columns of a row block in registers
#: and recomputes the similarity tiles for every further 128 (``(4 ceil(D / 128) + 2) N^2 D``
#: FLOPs against ``8 N^2 D`` for the streaming path's matrix products), and at the image
#: granularity of the paper (N of a few hundred rows of D = 100352 features) the N x N
#: matrices are tiny anyway. Chosen from that FLOP count, not yet from a GPU measurement:
#: ``benchmarks/statistics_kernel.py`` times both paths over D = 64..512.
TRITON_AUTO_MAX_FEATURES = 512


def _triton_error() -> str | None:
    """Why the Triton implementation cannot be used, or None if it can."""
    try:
        from .ops import triton_kernels  # noqa: F401
    except Exception as error:  # ImportError, or triton failing at import time
        return f"the Triton kernels could not be imported ({type(error).__name__}: {error})"
    return None


_SELF_CHECKS: dict[torch.device, bool] = {}


def _triton_self_check(device: torch.device) -> bool:
    """Once per device: do the Triton kernels compile and agree with the reference there?

    ``implementation="auto"`` uses Triton only if this tiny forward + backward (both kernels,
    exact float32 products whatever the TF32 setting) matches the float64 reference;
    otherwise it warns once and uses the streaming PyTorch path, so that a GPU or Triton
    build the kernels do not support degrades to a slower exact path instead of failing.
    It runs with gradients enabled even when the first call comes under ``torch.no_grad()``
    or ``torch.inference_mode()`` (a validation pass). Running out of memory is not
    cached as a failure. ``implementation="triton"`` skips this check.
    """
    if device not in _SELF_CHECKS:
        try:
            from .ops.triton_kernels import similarity_kl_triton

            with torch.inference_mode(False), torch.enable_grad():
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(2, 37, 19, generator=generator, dtype=torch.float64)
                y = x + 0.5 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
                upstream = torch.rand(2, 37, generator=generator, dtype=torch.float64)
                for kernel in ("cosine", "softmax"):
                    ref_x = x.clone().requires_grad_()
                    want = similarity_kl_reference(ref_x, y, kernel=kernel, temperature=0.1, include_self=True)
                    (want * upstream).sum().backward()
                    got_x = x.float().to(device).requires_grad_()
                    got = similarity_kl_triton(
                        got_x, y.float().to(device), kernel=kernel, temperature=0.1, include_self=True, allow_tf32=False
                    )
                    (got * upstream.float().to(device)).sum().backward()
                    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-3, atol=1e-5)
                    assert got_x.grad is not None
                    torch.testing.assert_close(got_x.grad.double().cpu(), ref_x.grad, rtol=1e-3, atol=1e-5)
            _SELF_CHECKS[device] = True
        except torch.cuda.OutOfMemoryError:
            return False  # transient: use the streaming path for this call, check again next time
        except Exception as error:  # compilation, launch or accuracy failure
            warnings.warn(
                f"d2sm_loss: the Triton kernels failed a self-check on {device} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); implementation='auto' uses the "
                "streaming PyTorch path instead. Please report this with your GPU and Triton versions.",
                RuntimeWarning,
                stacklevel=4,
            )
            _SELF_CHECKS[device] = False
    return _SELF_CHECKS[device]


def resolve_implementation(implementation: str, device: torch.device, features: int | None = None) -> str:
    """The concrete implementation (``"triton"``, ``"streaming"`` or ``"reference"``) that
    ``implementation`` selects for rows of ``features`` values on ``device``.

    ``"auto"`` picks Triton for CUDA tensors when Triton is importable, its kernels pass a
    one-time self-check on that device and ``features`` is at most
    :data:`TRITON_AUTO_MAX_FEATURES` (None: not known, no limit); else the streaming
    PyTorch path. While :func:`torch.compile` traces, ``"auto"`` always takes the streaming
    path: the self-check cannot run inside a trace, and the Triton kernels have not yet been
    tested inside a compiled graph (``"triton"`` asks for them explicitly). ``"triton"`` needs a
    CUDA device, or ``TRITON_INTERPRET=1`` set in the environment before :mod:`d2sm_loss` is
    imported (the Triton interpreter then runs the kernels on CPU tensors).
    """
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if implementation == "auto":
        if (
            device.type == "cuda"
            and not torch.compiler.is_compiling()
            and (features is None or features <= TRITON_AUTO_MAX_FEATURES)
            and _triton_error() is None
            and _triton_self_check(device)
        ):
            return "triton"
        return "streaming"
    if implementation == "triton":
        if device.type != "cuda" and not triton_interpreted():
            raise ValueError(
                f"implementation='triton' needs CUDA tensors, got tensors on {device}; set "
                "TRITON_INTERPRET=1 before importing d2sm_loss to run the kernels on the CPU "
                "through the Triton interpreter (slow, for testing), or use implementation='streaming'"
            )
        reason = _triton_error()
        if reason is not None:
            raise RuntimeError(f"implementation='triton' is unavailable: {reason}")
    return implementation


def similarity_kl(
    restored: Tensor,
    clean: Tensor,
    *,
    similarity: Similarity = "cosine",
    temperature: float = 0.1,
    include_self: bool = True,
    reduction: Reduction = "mean",
    implementation: Implementation = "auto",
) -> Tensor:
    """KL divergence between the similarity statistics of clean and restored features.

    For each group, every row ``i`` defines a distribution over rows ``j``,
    ``p(j | i) = s(c_ij) / sum_j s(c_ij)``, where ``c_ij`` is the cosine similarity of
    rows ``i`` and ``j`` and ``s`` a similarity function. The result is
    ``KL(p_clean(. | i) || p_restored(. | i))`` per row.

    Args:
        restored: features of the restored images, shape ``(N, D)`` or ``(G, N, D)``
            (G independent groups of N samples with D features). Receives the gradient.
        clean: features of the clean images, same shape. Treated as a constant.
        similarity: ``"cosine"``: ``s = (1 + c) / 2`` (the paper's); ``"softmax"``:
            ``s = exp((c - 1) / temperature)``.
        temperature: temperature of the softmax similarity, a positive finite number
            (checked, but unused, with the cosine similarity).
        include_self: whether ``j = i`` takes part in each row's distribution.
        reduction: ``"mean"`` over all rows of all groups, ``"sum"``, or ``"none"`` for
            the per-row values of shape ``(N,)`` or ``(G, N)``.
        implementation: ``"auto"`` (Triton on CUDA when available and D is at most
            :data:`TRITON_AUTO_MAX_FEATURES`, else the streaming PyTorch path, see
            :func:`resolve_implementation`), ``"triton"``, ``"streaming"`` (PyTorch,
            O(N * block) memory) or ``"reference"`` (plain, O(N^2) memory).

    Returns:
        a scalar, or the per-row values for ``reduction="none"``, in float32
        (float64 when the inputs are float64). Inputs in float16 or bfloat16 (for
        example under :func:`torch.autocast`) are accumulated in float32.

    Compiles with ``torch.compile(fullgraph=True)``: the checks read shapes and options
    only, never tensor values.
    """
    if not isinstance(restored, Tensor) or not isinstance(clean, Tensor):
        raise TypeError(
            f"restored and clean must be tensors, got {type(restored).__name__} and {type(clean).__name__}"
        )
    if restored.dim() not in (2, 3):
        raise ValueError(f"restored must have shape (N, D) or (G, N, D), got shape {tuple(restored.shape)}")
    check_pair(restored, clean)
    for name, tensor in (("restored", restored), ("clean", clean)):
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    check_choice("similarity", similarity, SIMILARITIES)
    temperature = check_number("temperature", temperature, positive=True)
    include_self = check_bool("include_self", include_self)
    check_choice("reduction", reduction, REDUCTIONS)
    n, d = restored.shape[-2], restored.shape[-1]
    if restored.numel() == 0:  # also G = 0 groups, whose mean would be NaN
        raise ValueError(
            f"restored must have at least one group, one row and one feature, got shape {tuple(restored.shape)}"
        )
    if not include_self and n < 2:
        raise ValueError(
            f"include_self=False needs at least 2 rows per group to compare, got N={n}"
        )
    impl = resolve_implementation(implementation, restored.device, d)

    squeeze = restored.dim() == 2
    x = restored.unsqueeze(0) if squeeze else restored
    y = clean.detach().unsqueeze(0) if squeeze else clean.detach()
    if impl == "triton":
        from .ops.triton_kernels import similarity_kl_triton

        rows = similarity_kl_triton(x, y, kernel=similarity, temperature=temperature, include_self=include_self)
    else:
        # Statistics in float32 at least (float64 stays float64), outside any autocast region.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = x.to(dtype), y.to(dtype)
            if impl == "streaming":
                from .ops.streaming import similarity_kl_streaming

                rows = similarity_kl_streaming(
                    x, y, kernel=similarity, temperature=temperature, include_self=include_self
                )
            else:
                rows = similarity_kl_reference(
                    x, y, kernel=similarity, temperature=temperature, include_self=include_self
                )
    if squeeze:
        rows = rows.squeeze(0)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows

"""Functional form of the D2SM statistic: :func:`similarity_kl`.

This is the single entry point to the math; :class:`d2sm_loss.SemanticStatisticsLoss`
calls it. It validates its arguments once, chooses an implementation from
:mod:`d2sm_loss.ops` and applies the reduction.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._compat import triton_interpreted
from ._warnings import warn_user
from .checks import check_bool, check_choice, check_number, check_pair
from .ops.reference import SIMILARITIES, similarity_kl_reference
from .rows import check_group_rows

__all__ = [
    "similarity_kl",
    "reduce_rows",
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


#: Self-check results by launch configuration: (device, dtype, block configuration, precision).
_SELF_CHECKS: dict[tuple, bool] = {}

#: (rtol, atol) of the self-check's values; gradients get ``rtol * max |gradient|`` as
#: absolute tolerance. Exact products (float64; float32 with "ieee") against looser ones
#: (TF32's 10-bit products; float16 / bfloat16 gradients returned in their own dtype).
_SELF_CHECK_TOLERANCES = {"float64": (1e-7, 1e-9), "ieee": (1e-3, 1e-5), "low": (5e-2, 5e-3)}


def _launch_configuration(device: torch.device, dtype: torch.dtype, features: int) -> tuple:
    """What the Triton path launches for rows of ``features`` values of ``dtype``: the
    kernels' compiled variant is fixed by the dtype, the block configuration
    (:func:`~d2sm_loss.ops.triton_kernels.choose_block_config`) and the tile products'
    precision (TF32 or exact, read from PyTorch's switch at this moment)."""
    from .ops.triton_kernels import _dot_precision, choose_block_config

    return (device, dtype, choose_block_config(features, dtype), _dot_precision(dtype))


def _triton_self_check(device: torch.device, dtype: torch.dtype = torch.float32, features: int | None = None) -> bool:
    """Once per launch configuration: do the Triton kernels compile and agree with the
    streaming path there?

    ``implementation="auto"`` uses Triton for rows of ``features`` values of ``dtype`` only
    if a small forward + backward of that configuration (the same dtype, block
    configuration and precision (TF32 or exact) as the real launch, on rows of the same
    width, both similarities) matches the streaming path, computed in float64 on the same
    rounded inputs; otherwise it warns once for that configuration and uses the streaming
    path, so that a GPU, Triton build, dtype or block configuration the kernels do not
    support degrades to a slower exact path instead of failing or returning wrong numbers.
    The results are cached per (device, dtype, block configuration, precision); a new
    configuration (another dtype, another feature bucket, TF32 switched on) is checked at
    its first use. It runs with gradients enabled even when the first call comes under
    ``torch.no_grad()`` or ``torch.inference_mode()`` (a validation pass). Running out of
    memory is not cached as a failure. ``implementation="triton"`` skips this check.
    """
    features = 19 if features is None else int(features)
    try:
        key = _launch_configuration(device, dtype, features)
    except Exception:  # the kernels do not import: not this function's to report
        return False
    if key not in _SELF_CHECKS:
        _, _, _, precision = key
        exact_float32 = dtype == torch.float32 and precision == "ieee"
        level = "float64" if dtype == torch.float64 else ("ieee" if exact_float32 else "low")
        rtol, atol = _SELF_CHECK_TOLERANCES[level]
        try:
            from .ops.streaming import similarity_kl_streaming
            from .ops.triton_kernels import similarity_kl_triton

            with torch.inference_mode(False), torch.enable_grad():
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(2, 37, features, generator=generator, dtype=torch.float64)
                y = x + 0.5 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
                x, y = x.to(dtype), y.to(dtype)  # the rounded inputs both paths see
                upstream = torch.rand(2, 37, generator=generator, dtype=torch.float64)
                for similarity in SIMILARITIES:
                    ref_x = x.double().clone().requires_grad_()
                    want = similarity_kl_streaming(
                        ref_x, y.double(), similarity=similarity, temperature=0.1, include_self=True
                    )
                    (want * upstream).sum().backward()
                    got_x = x.to(device).clone().requires_grad_()
                    got = similarity_kl_triton(
                        got_x, y.to(device), similarity=similarity, temperature=0.1, include_self=True,
                        allow_tf32=precision == "tf32",
                    )
                    (got * upstream.to(device, got.dtype)).sum().backward()
                    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=rtol, atol=atol)
                    assert got_x.grad is not None and ref_x.grad is not None
                    grad_atol = rtol * float(ref_x.grad.abs().max())
                    torch.testing.assert_close(got_x.grad.double().cpu(), ref_x.grad, rtol=rtol, atol=grad_atol)
            _SELF_CHECKS[key] = True
        except torch.cuda.OutOfMemoryError:
            return False  # transient: use the streaming path for this call, check again next time
        except Exception as error:  # compilation, launch or accuracy failure
            _, _, config, precision = key
            warn_user(
                f"d2sm_loss: the Triton kernels failed a self-check on {device} for {dtype} rows of {features} "
                f"features ({config}, {precision} products; {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); implementation='auto' uses the streaming "
                "PyTorch path for this configuration instead. Please report this with your GPU and Triton versions.",
                RuntimeWarning,
            )
            _SELF_CHECKS[key] = False
    return _SELF_CHECKS[key]


def _gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def resolve_implementation(
    implementation: str, device: torch.device, features: int | None = None, dtype: torch.dtype | None = None
) -> str:
    """The concrete implementation (``"triton"``, ``"streaming"`` or ``"reference"``) that
    ``implementation`` selects for rows of ``features`` values of ``dtype`` (None: float32)
    on ``device``.

    ``"auto"`` picks Triton for CUDA tensors when Triton is importable, its kernels pass a
    self-check for this launch configuration (dtype, block configuration, TF32 or exact
    products; once each, on rows of the real width) and ``features`` is at most
    :data:`TRITON_AUTO_MAX_FEATURES` (None: not known, no limit); else the streaming
    PyTorch path. While :func:`torch.compile` traces, ``"auto"`` always takes the streaming
    path: the self-check cannot run inside a trace, and the Triton kernels have not yet been
    tested inside a compiled graph (``"triton"`` asks for them explicitly). ``"triton"`` needs a
    CUDA device, or ``TRITON_INTERPRET=1`` set in the environment before :mod:`d2sm_loss` is
    imported (the Triton interpreter then runs the kernels on CPU tensors).

    Args:
        implementation: what the caller asked for, one of :data:`IMPLEMENTATIONS`.
        device: the device of the rows.
        features: the row width ``D``; for ``"auto"`` rows wider than
            :data:`TRITON_AUTO_MAX_FEATURES` take the streaming path. None: not known.
        dtype: the rows' dtype (the self-check runs in it). None: float32.

    Returns:
        ``"triton"``, ``"streaming"`` or ``"reference"``.

    Raises:
        ValueError: an unknown ``implementation``, or ``"triton"`` for tensors that are
            not on CUDA without the Triton interpreter.
        RuntimeError: ``"triton"`` when Triton or the kernels cannot be imported.

    >>> resolve_implementation("auto", torch.device("cpu"))
    'streaming'
    """
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if implementation == "auto":
        if (
            _gpu(device)
            and not torch.compiler.is_compiling()
            and (features is None or features <= TRITON_AUTO_MAX_FEATURES)
            and _triton_error() is None
            and _triton_self_check(device, dtype or torch.float32, features)
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
    r"""KL divergence between the similarity statistics of clean and restored features.

    For each group, every row :math:`i` defines a distribution over rows :math:`j`,
    :math:`p(j \mid i) = s(c_{ij}) / \sum_k s(c_{ik})`, where :math:`c_{ij}` is the cosine
    similarity of rows :math:`i` and :math:`j` and :math:`s` a similarity function. The
    result is, per row,

    .. math::

        \mathrm{KL}\big(p_\text{clean}(\cdot \mid i) \,\|\, p_\text{restored}(\cdot \mid i)\big)
        = \sum_j p_\text{clean}(j \mid i) \log \frac{p_\text{clean}(j \mid i)}{p_\text{restored}(j \mid i)} .

    Args:
        restored: features of the restored images, shape ``(N, D)`` or ``(G, N, D)``
            (G independent groups of N samples with D features). Receives the gradient.
        clean: features of the clean images, same shape. Treated as a constant.
        similarity: ``"cosine"``: :math:`s(c) = (1 + c) / 2` (the paper's); ``"softmax"``:
            :math:`s(c) = \exp((c - 1) / \tau)` with :math:`\tau` = ``temperature``.
        temperature: temperature of the softmax similarity, a positive finite number
            (checked, but unused, with the cosine similarity).
        include_self: whether ``j = i`` takes part in each row's distribution. ``False``
            needs ``N >= 3`` (:func:`~d2sm_loss.rows.min_rows`): with two rows each
            distribution is the other row with probability 1, and the statistic would be
            identically 0 (a ``ValueError``).
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

    >>> x = torch.randn(2, 50, 16, dtype=torch.float64)   # 2 groups of 50 rows, 16 features
    >>> similarity_kl(x, x, reduction="none").shape
    torch.Size([2, 50])
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
    check_group_rows(n, include_self)
    impl = resolve_implementation(implementation, restored.device, d, torch.promote_types(restored.dtype, clean.dtype))

    squeeze = restored.dim() == 2
    x = restored.unsqueeze(0) if squeeze else restored
    y = clean.detach().unsqueeze(0) if squeeze else clean.detach()
    if impl == "triton":
        from .ops.triton_kernels import similarity_kl_triton

        rows = similarity_kl_triton(x, y, similarity=similarity, temperature=temperature, include_self=include_self)
    else:
        # Statistics in float32 at least (float64 stays float64), outside any autocast region.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = x.to(dtype), y.to(dtype)
            if impl == "streaming":
                from .ops.streaming import similarity_kl_streaming

                rows = similarity_kl_streaming(
                    x, y, similarity=similarity, temperature=temperature, include_self=include_self
                )
            else:
                rows = similarity_kl_reference(
                    x, y, similarity=similarity, temperature=temperature, include_self=include_self
                )
    return reduce_rows(rows.squeeze(0) if squeeze else rows, reduction)


def reduce_rows(rows: Tensor, reduction: str, count: Tensor | int | None = None) -> Tensor:
    """The per-row values ``rows`` reduced: ``"none"`` as they are, ``"sum"``, or ``"mean"``
    over ``count`` rows (None: every entry of ``rows``; the queue's path passes its number
    of filled rows as a 0-d tensor, its unfilled entries being 0)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.mean() if count is None else rows.sum() / count

"""The streaming PyTorch path (:mod:`d2sm_loss.ops.streaming`) against the reference.

Agreement through :func:`d2sm_loss.similarity_kl` for every implementation is
``test_functional.py::test_implementations_agree_with_float64_oracle``; this module holds
what is particular to the streaming path: block sizes, saved state, tile memory.

Inputs are independent random features; ``special_rows`` adds an all-zero restored row, an
all-zero clean row and duplicated rows (``helpers.features``). Tolerances (stated once,
used throughout) are relative to the largest magnitude in the same row of the tensor
compared (``helpers.Tolerance.row_rtol``: a zero row's gradient, ~1 / NORM_EPS larger,
does not hide the others' errors):

- float64 streaming vs float64 reference: values and gradients agree to 1e-9 relative
  to that magnitude (plus 1e-12 absolute). The two paths round differently (fused scale,
  sums in another order), nothing more.
- float32 streaming vs float64 reference: values and gradients to 5e-5 relative plus 1e-6
  absolute (for gradients that are exactly 0, e.g. N=2 without self). Observed beyond the
  absolute part: at most 7e-7 (values) and 1.5e-6 (gradients) relative, for the shapes of
  ``test_float32_matches_float64_reference``; a wrong term or a missed mask misses these by
  orders of magnitude.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from d2sm_loss.functional import similarity_kl
from d2sm_loss.ops.reference import similarity_kl_reference
from d2sm_loss.ops.streaming import TILE_ELEMENTS, default_block_size, similarity_kl_streaming

from helpers import Tolerance, assert_close, features, upstream, value_and_grad

F64 = Tolerance(atol=1e-12, row_rtol=1e-9)
F32 = Tolerance(atol=1e-6, row_rtol=5e-5)

KERNELS = [("cosine", 0.1), ("softmax", 0.1)]


def _inputs(g: int, n: int, d: int, dtype=torch.float64, seed: int = 0, special_rows: bool = True):
    """Independent restored and clean features (G, N, D) and an incoming gradient (G, N)."""
    x, y = features(g, n, d, dtype, seed=seed, correlated=False, special_rows=special_rows)
    return x, y, upstream((g, n), dtype, seed=seed + 1)


def test_float32_zero_and_duplicate_rows_are_finite_and_match():
    x, y, grad = _inputs(3, 70, 17, seed=3)
    opts = dict(similarity="cosine", temperature=0.1, include_self=True)
    ref_rows, ref_dx = value_and_grad(similarity_kl_reference, x, y, grad, **opts)
    rows, dx = value_and_grad(similarity_kl_streaming, x.float(), y.float(), grad.float(), block_size=9, **opts)
    assert_close(rows, ref_rows, F32, "values")
    assert_close(dx, ref_dx, F32, "grad")  # per row: the zero row's gradient is ~1/NORM_EPS larger


@pytest.mark.parametrize("kernel,temperature", KERNELS)
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_inputs_give_exactly_zero(kernel, temperature, include_self, dtype):
    x, _, grad = _inputs(3, 45, 9, dtype=dtype, seed=5)
    x = x.requires_grad_(True)
    rows = similarity_kl_streaming(x, x.detach().clone(), similarity=kernel, temperature=temperature,
                                   include_self=include_self, block_size=8)
    (dx,) = torch.autograd.grad(rows, x, grad)
    assert torch.equal(rows, torch.zeros_like(rows))
    assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("temperature", [0.01, 0.002])
def test_small_temperature_without_self_stays_finite(temperature):
    # exp((c - 1) / tau) underflows to 0 for every j != i when the rows are spread out:
    # the logsumexp path keeps the values and gradients finite and equal to the reference.
    x, y, grad = _inputs(2, 40, 64, seed=9, special_rows=False)
    opts = dict(similarity="softmax", temperature=temperature, include_self=False)
    ref_rows, ref_dx = value_and_grad(similarity_kl_reference, x, y, grad, **opts)
    assert torch.isfinite(ref_rows).all()
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        rows, dx = value_and_grad(similarity_kl_streaming, x.to(dtype), y.to(dtype), grad.to(dtype), block_size=6, **opts)
        assert_close(rows, ref_rows, Tolerance(row_rtol=rtol), f"values {dtype}")
        assert_close(dx, ref_dx, Tolerance(row_rtol=rtol * 10), f"grad {dtype}")


def test_y_gets_no_gradient_and_x_without_grad_works():
    x, y, _ = _inputs(1, 10, 4, seed=1)
    y = y.requires_grad_(True)
    x = x.requires_grad_(True)
    similarity_kl_streaming(x, y, similarity="cosine", temperature=0.1, include_self=True).sum().backward()
    assert x.grad is not None and y.grad is None
    out = similarity_kl_streaming(x.detach(), y.detach(), similarity="cosine", temperature=0.1, include_self=True)
    assert not out.requires_grad


def test_saved_state_is_linear_in_n():
    g, n, d = 2, 300, 7
    x, y, _ = _inputs(g, n, d, seed=2)
    x.requires_grad_(True)
    rows = similarity_kl_streaming(x, y, similarity="cosine", temperature=0.1, include_self=True, block_size=16)
    saved = rows.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == 2 * g * n * d + 4 * g * n  # inputs; norms, scales, log Zx, log Zy
    assert max(t.numel() for t in saved) < n * n


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen operation returns (inside autograd too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kernel", ["cosine", "softmax"])
def test_no_operation_produces_more_than_one_tile(kernel):
    g, n, d, block = 2, 400, 8, 24
    x, y, grad = _inputs(g, n, d, dtype=torch.float32, seed=4)
    x.requires_grad_(True)
    with _LargestTensor() as mode:
        rows = similarity_kl_streaming(x, y, similarity=kernel, temperature=0.1, include_self=False, block_size=block)
        rows.backward(grad)
    assert mode.largest <= max(g * block * n, g * n * d)
    with _LargestTensor() as mode:
        similarity_kl_reference(x, y, similarity=kernel, temperature=0.1, include_self=False).backward(grad)
    assert mode.largest >= g * n * n  # the check above is able to see an N x N matrix


def test_default_block_size_adapts_to_n():
    assert default_block_size(1, 4096) == TILE_ELEMENTS // 4096
    assert default_block_size(8, 4096) == TILE_ELEMENTS // (8 * 4096)
    assert default_block_size(1, 10) == 10
    assert default_block_size(4, 1 << 20) == 1
    for g, n in ((1, 4096), (8, 4096), (1, 16384), (3, 70)):
        assert g * default_block_size(g, n) * n <= max(TILE_ELEMENTS, g * n)


def test_invalid_arguments():
    x, y, _ = _inputs(1, 5, 3, seed=0)
    with pytest.raises(ValueError):
        similarity_kl_streaming(x, y, similarity="cosine", temperature=0.1, include_self=True, block_size=0)
    with pytest.raises(ValueError):
        similarity_kl_streaming(x, y, similarity="gauss", temperature=0.1, include_self=True)
    with pytest.raises(ValueError):
        similarity_kl_streaming(x[0], y[0], similarity="cosine", temperature=0.1, include_self=True)
    with pytest.raises(TypeError):
        similarity_kl_streaming(x.half(), y.half(), similarity="cosine", temperature=0.1, include_self=True)


# --- through the public functional API -------------------------------------------------


def test_functional_auto_on_cpu_is_streaming_and_half_inputs_accumulate_in_float32():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 8, generator=gen)
    y = torch.randn(2, 20, 8, generator=gen)
    auto = similarity_kl(x, y, implementation="auto", reduction="none")
    torch_path = similarity_kl(x, y, implementation="streaming", reduction="none")
    assert torch.equal(auto, torch_path)
    xb = x.bfloat16().requires_grad_(True)
    out = similarity_kl(xb, y.bfloat16(), implementation="streaming")
    assert out.dtype == torch.float32
    out.backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    ref = similarity_kl(xb.detach(), y.bfloat16(), implementation="reference")
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-7)


def test_cosine_below_minus_one_from_rounding_stays_finite(monkeypatch):
    """Antiparallel rows whose computed cosine falls below -1 (as TF32 or float16 products
    can give) keep a finite loss and gradient: simulated by unit rows 1 % too long."""
    from d2sm_loss.ops import streaming

    original = streaming._unit_rows
    monkeypatch.setattr(streaming, "_unit_rows", lambda f: (lambda u, n, s: (u * 1.01, n, s))(*original(f)))
    base = torch.randn(1, 9, 5, generator=torch.Generator().manual_seed(3))
    x = torch.cat([base, -base], dim=1).requires_grad_()
    out = similarity_kl_streaming(x, x.detach() + 0.1, similarity="cosine", temperature=1.0, include_self=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_reference_log_similarity_is_finite_below_minus_one():
    from d2sm_loss.ops.reference import COSINE_ETA, log_similarity

    cos = torch.tensor([-1.02, -1.0, 0.0, 1.0], requires_grad=True)
    value = log_similarity(cos, "cosine", 1.0)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(cos.grad).all()
    assert value[0].item() == pytest.approx(torch.log(torch.tensor(COSINE_ETA)).item())


def test_gpu_tile_budget_applies_off_the_cpu():
    from d2sm_loss.ops.streaming import TILE_ELEMENTS_GPU

    assert TILE_ELEMENTS_GPU > TILE_ELEMENTS
    assert default_block_size(8, 16384, TILE_ELEMENTS_GPU) == TILE_ELEMENTS_GPU // (8 * 16384)

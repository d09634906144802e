"""Triton kernels vs the plain reference, on the CPU through the Triton interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when no GPU is present, before this
module imports the kernels. The interpreter is slow, so shapes are small and odd (never
multiples of the 16-row / 32-column interpreter tiles) and every case runs one forward and
one backward pass. Agreement over shapes, dtypes and reductions, for every implementation,
is ``test_functional.py::test_implementations_agree_with_float64_oracle``; this module holds
what is particular to the kernels: degenerate rows, underflow, tile configurations,
strides, mixed dtypes.

Tolerances: float64 inputs, values and gradients within 1e-10 + 1e-12 * |reference|
(observed ~1e-15 relative).
"""

from __future__ import annotations

import pytest
import torch

from d2sm_loss.ops.reference import similarity_kl_reference

from helpers import DEVICE, features, triton_skip_reason, upstream, value_and_grad

if triton_skip_reason():
    pytest.skip(triton_skip_reason(), allow_module_level=True)

from d2sm_loss.ops import triton_kernels  # noqa: E402  (after the skip: needs Triton)

similarity_kl_triton = triton_kernels.similarity_kl_triton

TEMPERATURE = 0.1
KERNEL_MODES = [("cosine", True), ("cosine", False), ("softmax", True), ("softmax", False)]


def _compare_float64(x: torch.Tensor, y: torch.Tensor, kernel: str, include_self: bool, temperature: float = TEMPERATURE):
    kwargs = dict(similarity=kernel, temperature=temperature, include_self=include_self)
    grad_out = upstream(x.shape[:2], seed=1, device=DEVICE)
    out, grad = value_and_grad(similarity_kl_triton, x, y, grad_out, **kwargs)
    ref, ref_grad = value_and_grad(similarity_kl_reference, x, y, grad_out, **kwargs)
    assert out.shape == x.shape[:2] and out.dtype == torch.float64
    assert grad.shape == x.shape and grad.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)
    # Zero rows have gradients of order 1 / NORM_EPS: hence the relative part.
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kernel,include_self", KERNEL_MODES)
def test_zero_and_duplicated_rows(kernel: str, include_self: bool) -> None:
    x, y = features(2, 21, 19, torch.float64, seed=7, device=DEVICE)
    x[0, 3] = 0.0  # an all-zero restored row (finite value and gradient via NORM_EPS)
    x[1, 20] = 0.0
    y[0, 5] = 0.0  # an all-zero clean row
    y[1, 3] = 0.0  # zero in y where x is not, and the other way round
    x[0, 7] = x[0, 2]  # duplicated rows: c_ij = 1 off the diagonal
    x[0, 8] = 2.5 * x[0, 2]
    y[0, 7] = y[0, 2]
    x[1, 10] = -x[1, 11]  # antipodal rows: c_ij = -1, log s = log(eta) for "cosine"
    y[1, 0] = y[1, 1]
    _compare_float64(x, y, kernel, include_self)


@pytest.mark.parametrize("temperature", [0.005, 0.002])
def test_softmax_small_temperature_does_not_underflow(temperature: float) -> None:
    """Every off-diagonal exp((c - 1) / tau) underflows float32 here (|c| <~ 0.05 and
    tau <= 0.005 give exponents below -190, float32's smallest subnormal is e^-103), so
    only the online log-sum-exp keeps log Z finite."""
    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))[0][:18]  # orthonormal rows
    y64 = basis.unsqueeze(0) + 0.01 * torch.randn(1, 18, 24, generator=gen, dtype=torch.float64)
    x64 = basis.unsqueeze(0) + 0.01 * torch.randn(1, 18, 24, generator=gen, dtype=torch.float64)
    x32, y32 = x64.float().to(DEVICE), y64.float().to(DEVICE)
    kwargs = dict(similarity="softmax", temperature=temperature, include_self=False)
    grad_out = torch.randn(1, 18, generator=gen, dtype=torch.float64).to(DEVICE)
    out, grad = value_and_grad(similarity_kl_triton, x32, y32, grad_out, **kwargs)
    ref, ref_grad = value_and_grad(similarity_kl_reference, x32.double(), y32.double(), grad_out, **kwargs)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert ref.abs().max() > 1.0  # the statistic is far from trivial
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-3 * ref_grad.abs().max().item())
    # float64 inputs through the kernels agree tightly as well.
    _compare_float64(x64.to(DEVICE), y64.to(DEVICE), "softmax", include_self=False, temperature=temperature)


def test_noncontiguous_inputs_and_no_grad_for_y() -> None:
    x, y = features(2, 19, 33, torch.float32, seed=9, device=DEVICE)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # (G, N, D) view, not contiguous
    y_t = y[:, :, :].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not x_t.is_contiguous() and not y_t.is_contiguous()
    out = similarity_kl_triton(x_t, y_t, similarity="cosine", temperature=TEMPERATURE, include_self=False)
    out.sum().backward()
    assert y_t.grad is None
    x_ref = x.clone().requires_grad_(True)
    similarity_kl_reference(x_ref, y, similarity="cosine", include_self=False).sum().backward()
    torch.testing.assert_close(out, similarity_kl_reference(x, y, similarity="cosine", include_self=False), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x_t.grad, x_ref.grad, rtol=1e-4, atol=1e-6)


def test_mixed_dtypes_run_in_the_promoted_dtype() -> None:
    """float16 restored features with large float32 clean ones: both go to float32 (a
    downcast of the clean side to float16 would overflow its norms to inf)."""
    x, y = features(1, 33, 17, torch.float32, seed=11, device=DEVICE)
    x16, y_big = x.half(), y * 1e5  # beyond float16 range (65504)
    kwargs = dict(similarity="cosine", temperature=TEMPERATURE, include_self=True)
    grad_out = torch.ones(1, 33, device=DEVICE)
    out, grad = value_and_grad(similarity_kl_triton, x16, y_big, grad_out, **kwargs)
    ref, ref_grad = value_and_grad(similarity_kl_reference, x16.float(), y_big, grad_out, **kwargs)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2, atol=1e-3 * ref_grad.abs().max().item())


def test_cosine_below_minus_one_from_rounding_stays_finite(monkeypatch) -> None:
    """Antiparallel rows whose computed cosine falls below -1 (as TF32 or float16 products
    can give): the kernel holds the similarity at its bound instead of taking log of a
    negative number. Simulated by inflating the reciprocal norms by 1 %."""
    original = triton_kernels._reciprocal_norms

    def inflated(features, acc_dtype):
        rinv, norms = original(features, acc_dtype)
        return rinv * 1.01, norms

    monkeypatch.setattr(triton_kernels, "_reciprocal_norms", inflated)
    base = torch.randn(1, 9, 5, generator=torch.Generator().manual_seed(3))
    x = torch.cat([base, -base], dim=1).to(DEVICE).requires_grad_()
    y = x.detach() + 0.1
    out = similarity_kl_triton(x, y, similarity="cosine", temperature=1.0, include_self=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("d", [100, 200, 300, 700])  # each backward tile configuration of a GPU
@pytest.mark.parametrize("kernel,include_self", [("cosine", False), ("softmax", True)])
def test_gpu_block_configurations(monkeypatch, d: int, kernel: str, include_self: bool) -> None:
    """The tile sizes a GPU launch uses (64-row forward tiles, 32- or 64-row backward tiles
    owning up to 512 gradient columns, or 128-column chunks beyond), run with float64
    inputs so that any masking or chunking error shows at float64 precision. N = 70 is no
    multiple of any tile."""
    gpu_config = triton_kernels.choose_block_config(d, torch.float32, interpreted=False)
    monkeypatch.setattr(triton_kernels, "choose_block_config", lambda *args, **kwargs: gpu_config)
    x, y = features(1, 70, d, torch.float64, seed=d, device=DEVICE)
    _compare_float64(x, y, kernel, include_self)

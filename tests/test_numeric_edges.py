"""Every path (reference, streaming, Triton) against the float64 oracle at the edges of the
domain: exactly antipodal rows (c = -1) and extreme but finite magnitudes."""

import pytest
import torch

from d2sm_loss import similarity_kl

from helpers import DEVICE, TOLERANCES, Tolerance, assert_close, kl_gradient, loop_kl, triton_skip_reason

PATHS = ["reference", "streaming", "triton"]


def _run(path, x, y, weights, kernel):
    if path == "triton" and triton_skip_reason():
        pytest.skip(triton_skip_reason())
    device = DEVICE if path == "triton" else "cpu"
    xx = x.to(device).requires_grad_()
    rows = similarity_kl(xx, y.to(device), similarity=kernel, temperature=0.1, reduction="none", implementation=path)
    (rows * weights.to(device, rows.dtype)).sum().backward()
    return rows.detach().cpu(), xx.grad.cpu()


def _oracle(x, y, weights, kernel):
    return loop_kl(x, y, kernel, 0.1, True), kl_gradient(x, y, weights, kernel, 0.1, True)


def _signed_rows(n, d, g):
    """Rows of four entries +-1 (norm 2): unit rows of +-0.5, so every cosine (-1 included)
    is exact in any dtype, and the paths differ only by their own arithmetic."""
    x = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        x[i, torch.randperm(d, generator=g)[:4]] = torch.where(torch.rand(4, generator=g) < 0.5, -1.0, 1.0).double()
    return x


def antipodal(dtype, seed, exact=True):
    g = torch.Generator().manual_seed(seed)
    n, d = 11, 19
    if exact:
        x, y = _signed_rows(n, d, g), _signed_rows(n, d, g)
    else:
        x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    x[1], y[1] = -x[0], -y[0]  # antipodal in both
    x[3] = -4 * x[2]  # antipodal in the restored rows only: a large p_clean on a tiny p_restored
    y[6] = -0.25 * y[5]  # and in the clean rows only
    x = x * torch.exp2(torch.randint(-3, 4, (n, 1), generator=g)).double()  # rows of several norms
    return x.to(dtype), y.to(dtype), torch.rand(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel", ["cosine", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exactly_antipodal_rows_agree_with_the_oracle(path, kernel, dtype, seed):
    x, y, weights = antipodal(dtype, seed)
    want, want_grad = _oracle(x, y, weights, kernel)
    got, grad = _run(path, x, y, weights, kernel)
    tol = TOLERANCES[dtype]
    assert_close(got, want, tol.value, f"{path} values")
    assert_close(grad, want_grad, tol.grad, f"{path} gradient")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel", ["cosine", "softmax"])
def test_antipodal_random_rows_in_float64_agree_with_the_oracle(path, kernel):
    """Rows antipodal in exact arithmetic but not after rounding: a computed cosine is off
    by ~1e-16 and d log s / dc reaches 1 / (2 COSINE_ETA) = 5e5 there, hence ~1e-10 (the
    conditioning of the statistic, not of a path; in float32 the same is ~1e-2, which is
    why float32 is checked on exactly representable cosines above)."""
    x, y, weights = antipodal(torch.float64, 5, exact=False)
    want, want_grad = _oracle(x, y, weights, kernel)
    got, grad = _run(path, x, y, weights, kernel)
    conditioned = Tolerance(atol=1e-12, row_rtol=1e-9)
    assert_close(got, want, conditioned, f"{path} values")
    assert_close(grad, want_grad, conditioned, f"{path} gradient")


MAGNITUDES = {
    torch.float32: [1e-38, 1e-30, 1e-20, 1e20, 1e30, 1e37],
    torch.float64: [1e-300, 1e-30, 1e30, 1e300],
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,magnitude", [(t, m) for t, ms in MAGNITUDES.items() for m in ms])
def test_any_finite_magnitude_gives_the_statistic_of_the_unit_rows(path, dtype, magnitude):
    """Cosines do not depend on the rows' scale: features of 1e30 or 1e-30 give the same
    value as features of order 1 (never a silent 0), and the gradient scales as 1 / |x|."""
    g = torch.Generator().manual_seed(4)
    y64 = torch.randn(9, 13, generator=g, dtype=torch.float64)
    x64 = y64 + 0.7 * torch.randn(9, 13, generator=g, dtype=torch.float64)
    x64[0] = 0.0  # an all-zero row keeps its convention at every magnitude
    weights = torch.rand(9, generator=g, dtype=torch.float64)
    x, y = (x64 * magnitude).to(dtype), (y64 * magnitude).to(dtype)
    assert torch.isfinite(x).all() and (x[1:] != 0).any(dim=-1).all()  # finite, nonzero rows
    want, want_grad = _oracle(x, y, weights, "cosine")
    got, grad = _run(path, x, y, weights, "cosine")
    assert got.mean() > 0.01
    tol = TOLERANCES[dtype]
    assert_close(got, want, tol.value, f"{path} values at {magnitude:g}")
    # Compared at the scale of unit rows (a gradient of 1e38 or 1e-300 and its oracle alike).
    assert torch.isfinite(grad[1:]).all()
    assert_close(grad[1:] * magnitude, want_grad[1:] * magnitude, tol.grad, f"{path} gradient at {magnitude:g}")

"""Second derivatives (double backward) of the streaming and Triton implementations.

Both take the first derivative with the reference's math when the backward records a
graph (``create_graph=True``), so every second derivative must equal the reference's:
with respect to the features and with respect to the incoming gradient. Triton runs
through its CPU interpreter when there is no GPU (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before the kernels are imported); shapes are small and odd.

Tolerances: float64 throughout; the second-order paths compute the reference's own
operations, so derivatives agree to 1e-12 relative to the largest entry (plus 1e-12
absolute); first derivatives from the fused paths (ordinary backward) agree with the
``create_graph`` ones to the 1e-9 their own reference tests use.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from d2sm_loss.ops import streaming
from d2sm_loss.ops.reference import similarity_kl_reference, similarity_kl_vjp
from d2sm_loss.ops.streaming import similarity_kl_streaming

from helpers import Tolerance, assert_close, features, second_order

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_USABLE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _streaming(x, y, **kwargs):
    return similarity_kl_streaming(x, y, block_size=3, **kwargs)  # 3 does not divide N = 7


def _triton(x, y, **kwargs):
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    return similarity_kl_triton(x, y, **kwargs)


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not TRITON_USABLE,
    reason="needs Triton, and a GPU or TRITON_INTERPRET=1",
)
IMPLEMENTATIONS = [
    pytest.param(_streaming, id="streaming"),
    pytest.param(_triton, id="triton", marks=needs_triton),
]


def _features(groups: int, n: int, d: int, seed: int, dtype: torch.dtype = torch.float64):
    """Restored features ``x`` (a leaf requiring grad) and correlated clean features ``y``."""
    x, y = features(groups, n, d, dtype, seed=seed, device=DEVICE)
    return x.requires_grad_(True), y


@pytest.mark.parametrize("fn", IMPLEMENTATIONS)
def test_graph_reaches_tensors_before_a_non_contiguous_input(fn) -> None:
    """The saved input is the caller's tensor, not a contiguous copy made inside."""
    base = torch.randn(9, 2, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
    base.requires_grad_(True)
    _, y = _features(2, 9, 5, seed=9)
    direction = torch.randn(9, 2, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64).to(DEVICE)
    results = []
    for impl in (fn, similarity_kl_reference):
        x = (1.5 * base).transpose(0, 1)  # (G, N, D), not contiguous
        assert not x.is_contiguous()
        rows = impl(x, y, similarity="cosine", temperature=0.1, include_self=False)
        (g,) = torch.autograd.grad(rows.sum(), base, create_graph=True)
        (hvp,) = torch.autograd.grad((g * direction).sum(), base)
        results.append(hvp)
    assert_close(results[0], results[1], Tolerance(max_rtol=1e-12, atol=1e-12), "Hessian-vector product")


def test_ordinary_backward_keeps_the_streaming_path(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran during an ordinary backward")

    monkeypatch.setattr(streaming, "similarity_kl_vjp", fail)
    x, y = _features(1, 7, 5, seed=11)
    similarity_kl_streaming(x, y, similarity="cosine", temperature=0.1, include_self=True).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(AssertionError, match="the reference ran"):
        rows = similarity_kl_streaming(x, y, similarity="cosine", temperature=0.1, include_self=True)
        torch.autograd.grad(rows.sum(), x, create_graph=True)


@needs_triton
def test_ordinary_backward_keeps_the_triton_kernel(monkeypatch) -> None:
    from d2sm_loss.ops import triton_kernels

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran during an ordinary backward")

    monkeypatch.setattr(triton_kernels, "similarity_kl_vjp", fail)
    x, y = _features(1, 7, 5, seed=12)
    triton_kernels.similarity_kl_triton(x, y, similarity="softmax", temperature=0.1, include_self=False).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_second_order_in_lower_precision(dtype: torch.dtype) -> None:
    """The first derivative is taken in float32 and returned in the input dtype; the
    Hessian-vector product is the float32 reference's on the same (rounded) inputs."""
    x, y = _features(2, 9, 6, seed=13, dtype=dtype)
    upstream = torch.randn(2, 9, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    direction = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(15)).to(DEVICE, dtype)
    kwargs = dict(similarity="cosine", temperature=0.1, include_self=True)
    g, hvp, dw = second_order(_triton, x, y, upstream, direction, **kwargs)
    assert g.dtype == dtype and hvp.dtype == dtype
    ref_g, ref_hvp, ref_dw = second_order(similarity_kl_reference, x.float(), y.float(), upstream, direction.float(),
                                           **kwargs)
    tol = 1e-6 if dtype == torch.float32 else 2.0**-10
    assert_close(g.float(), ref_g, Tolerance(max_rtol=tol, atol=1e-12), "first derivative")
    assert_close(hvp.float(), ref_hvp, Tolerance(max_rtol=tol, atol=1e-12), "Hessian-vector product")
    assert_close(dw, ref_dw, Tolerance(max_rtol=tol, atol=1e-12), "derivative with respect to the incoming gradient")


@pytest.mark.parametrize("implementation", ["streaming", pytest.param("triton", marks=needs_triton)])
def test_public_functional_double_backward(implementation: str) -> None:
    from d2sm_loss.functional import similarity_kl

    x, y = _features(2, 8, 5, seed=16)
    direction = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(17), dtype=torch.float64).to(DEVICE)
    results = []
    for impl in (implementation, "reference"):
        value = similarity_kl(x, y, similarity="softmax", temperature=0.3, include_self=False, implementation=impl)
        (g,) = torch.autograd.grad(value, x, create_graph=True)
        (hvp,) = torch.autograd.grad((g * direction).sum(), x)
        results.append(hvp)
    assert_close(results[0], results[1], Tolerance(max_rtol=1e-12, atol=1e-12), "Hessian-vector product")


def test_vjp_helper_needs_x_to_require_grad() -> None:
    x, y = _features(1, 4, 3, seed=18)
    with pytest.raises(ValueError, match="x must require grad"):
        similarity_kl_vjp(x.detach(), y, torch.ones(1, 4), similarity="cosine", temperature=0.1, include_self=True)


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
def test_streaming_gradient_is_float32_when_backward_runs_inside_autocast(create_graph: bool) -> None:
    """The forward leaves autocast regions; so must both backward paths (the fused one and the
    reference's differentiable one), or a bfloat16 region would round the similarities."""
    x64, y64 = features(2, 37, 19, seed=19)  # on the CPU, where the autocast region below is
    x, y = x64.float().requires_grad_(), y64.float()
    upstream = torch.rand(2, 37, generator=torch.Generator().manual_seed(20))
    want_x = x64.clone().requires_grad_()
    (want,) = torch.autograd.grad((similarity_kl_reference(want_x, y64) * upstream.double()).sum(), want_x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = (similarity_kl_streaming(x, y, similarity="cosine", temperature=0.1, include_self=True) * upstream).sum()
        (got,) = torch.autograd.grad(value, x, create_graph=create_graph)
    assert got.dtype == torch.float32
    assert_close(got.double(), want, Tolerance(max_rtol=1e-5, atol=1e-12), "gradient under autocast")

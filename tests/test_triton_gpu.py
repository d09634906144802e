"""The compiled Triton kernels on a CUDA GPU: large N, many groups, low precision, memory.

Skipped when CUDA is unavailable (CI has no GPU); never skipped on a GPU machine.

References and tolerances:
- float16 / bfloat16 inputs are compared with a float32 reference evaluated on the same
  (rounded) inputs upcast to float32: :func:`similarity_kl_reference` for N <= 4096, the
  streaming path :func:`d2sm_loss.ops.streaming.similarity_kl_streaming` beyond (the
  reference's N x N matrices would not fit). KL within 1e-4 + 1e-3 * |KL| (both sides
  accumulate in float32, in different orders, over up to 16384 terms per row); gradients,
  returned in the input dtype, within 8 ulps of that dtype relative to the largest entry.
- float32 / float64 inputs against a float64 reference: KL and gradients within 2e-5 (float32,
  ``ieee`` tile products) and 1e-10 (float64).
- Memory: the peak extra memory of forward + backward grows linearly in N (an N x N float32
  matrix at N = 16384 would take 1 GiB).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _features(groups: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated restored / clean features in float32 on the GPU (G, N, D)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randn(groups, n, d, device="cuda", generator=gen)
    x = y + 0.7 * torch.randn(groups, n, d, device="cuda", generator=gen)
    return x, y


def _value_and_grad(fn, x: torch.Tensor, y: torch.Tensor, upstream: torch.Tensor, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, y, **kwargs)
    (grad,) = torch.autograd.grad(out, x, upstream.to(out.dtype))
    return out.detach(), grad


def _float32_reference(n: int):
    from d2sm_loss.ops.reference import similarity_kl_reference

    if n <= 4096:
        return similarity_kl_reference
    streaming = pytest.importorskip("d2sm_loss.ops.streaming")
    return streaming.similarity_kl_streaming


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,include_self", [("cosine", True), ("softmax", False)])
@pytest.mark.parametrize("n,groups,d", [(1000, 8, 200), (4096, 4, 64), (16384, 8, 96)])
def test_large_low_precision(n: int, groups: int, d: int, kernel: str, include_self: bool, dtype: torch.dtype) -> None:
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    x, y = _features(groups, n, d, seed=n + d)
    x, y = x.to(dtype), y.to(dtype)
    kwargs = dict(kernel=kernel, temperature=0.1, include_self=include_self)
    upstream = torch.randn(groups, n, device="cuda")
    out, grad = _value_and_grad(similarity_kl_triton, x, y, upstream, **kwargs)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    ref, ref_grad = _value_and_grad(_float32_reference(n), x.float(), y.float(), upstream, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad, rtol=0, atol=8 * ULP[dtype] * scale)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize(
    "kernel,include_self,temperature",
    [("cosine", True, 0.1), ("cosine", False, 0.1), ("softmax", True, 0.1), ("softmax", False, 0.01)],
)
def test_full_precision_against_float64(dtype, atol, kernel, include_self, temperature) -> None:
    from d2sm_loss.ops.reference import similarity_kl_reference
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    x, y = _features(3, 1500, 130, seed=5)  # 130 features: two D chunks of the gradient
    x, y = x.to(dtype), y.to(dtype)
    kwargs = dict(kernel=kernel, temperature=temperature, include_self=include_self)
    upstream = torch.randn(3, 1500, device="cuda", dtype=torch.float64)
    out, grad = _value_and_grad(similarity_kl_triton, x, y, upstream, **kwargs)
    ref, ref_grad = _value_and_grad(similarity_kl_reference, x.double(), y.double(), upstream, **kwargs)
    torch.testing.assert_close(out.double(), ref, rtol=atol, atol=atol)
    scale = max(ref_grad.abs().max().item(), 1.0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=atol, atol=atol * scale)


def test_peak_memory_grows_linearly() -> None:
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    d = 256
    extra: dict[int, int] = {}
    for n in (2048, 4096, 8192, 16384):
        x, y = _features(1, n, d, seed=n)
        x, y = x.half().requires_grad_(True), y.half()
        similarity_kl_triton(x, y, kernel="softmax", temperature=0.1, include_self=False).sum().backward()  # compile
        x.grad = None
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        similarity_kl_triton(x, y, kernel="softmax", temperature=0.1, include_self=False).sum().backward()
        torch.cuda.synchronize()
        extra[n] = torch.cuda.max_memory_allocated() - baseline
        del x, y
    # Linear: x8 from 2048 to 16384 rows (quadratic would be x64); slack for allocator rounding.
    assert extra[16384] <= 12 * extra[2048], extra
    # Far below one N x N float32 matrix (1 GiB at N = 16384).
    assert extra[16384] < 4 * 16384 * 16384 // 16, extra
    # About 6 bytes per feature (float32 gradient buffer + float16 copy) plus O(N) stats.
    assert extra[16384] < 16 * 16384 * d + (8 << 20), extra

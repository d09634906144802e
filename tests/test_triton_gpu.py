"""The compiled Triton kernels on a CUDA GPU: large N, many groups, low precision, large D,
memory, and the dispatch of ``implementation="auto"`` (self-check, TF32, no_grad).

Skipped when CUDA is unavailable (CI has no GPU); never skipped on a GPU machine. Run on
the GPU machine with ``PYTHONPATH=. python -m pytest -q tests/test_triton_gpu.py``.

References and tolerances (the float32 error figures quoted are from CPU proxies: the
float32 reference and streaming paths against float64 on the same data):
- float16 / bfloat16 inputs are compared with a float32 reference evaluated on the same
  (rounded) inputs upcast to float32: :func:`similarity_kl_reference` for N <= 4096, the
  streaming path :func:`d2sm_loss.ops.streaming.similarity_kl_streaming` beyond (the
  reference's N x N matrices would not fit). Products of two float16/bfloat16 values are
  exact in float32, so both sides see the same numbers and differ only by float32
  accumulation order: about 1e-6 on the KL (two float32 paths differ by 1.0-1.4e-6 at
  N = 1000..4096, mostly from ``log Z ~ log N``). KL within 1e-5 + 1e-3 * |KL| (the cosine
  KL is about 2e-3..5e-3: 1e-4 was a 2-5 % tolerance); gradients, returned in the input
  dtype, within 8 ulps of that dtype relative to the largest entry.
- float32 / float64 inputs against a float64 reference, relative to the largest gradient
  entry with no floor (float32 cosine gradients peak at about 4e-4; a floor of 1.0 made
  the check vacuous): float32 (``ieee`` tile products) gradients within 2e-5 (proxies use
  0.1-0.25 of it), KL within 5e-6 + 2e-5 * |KL| (proxy error about 6e-7 on a cosine KL of
  2.5e-3; the softmax T = 0.01 KL of about 9 is bounded by the relative term, which the
  proxies use up to 0.7 of); float64 within 1e-10. The softmax kernel divides the similarity
  by T, so the KL's relative term grows by 0.1 / T below T = 0.1 (on an H200 the float32
  Triton KL at T = 0.01 differed from float64 by 3.0e-5 relative in one row of 4500, against
  2e-5 set from the CPU proxies at T = 0.1).
- Large D (N = 300, D = 5000: 40 chunks of gradient columns, each recomputing the tiles):
  float32 against float64, KL within 5e-6 + 1e-4 * |KL|, gradients within 5e-5 of the
  largest entry (proxy errors 6e-7 and 5e-6).
- Memory: the peak extra memory of forward + backward grows linearly in N (an N x N float32
  matrix at N = 16384 would take 1 GiB); float32 at G = 8, N = 16384, D = 256 stays within
  a 2 GB budget (read as 2e9 bytes).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import features, subprocess_env, value_and_grad

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


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

    x, y = features(groups, n, d, dtype, seed=n + d, device="cuda")
    kwargs = dict(similarity=kernel, temperature=0.1, include_self=include_self)
    upstream = torch.randn(groups, n, device="cuda")
    out, grad = value_and_grad(similarity_kl_triton, x, y, upstream, **kwargs)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    ref, ref_grad = value_and_grad(_float32_reference(n), x.float(), y.float(), upstream, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-5)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad, rtol=0, atol=8 * ULP[dtype] * scale)


@pytest.mark.parametrize("dtype,atol,kl_atol", [(torch.float32, 2e-5, 5e-6), (torch.float64, 1e-10, 1e-10)])
@pytest.mark.parametrize(
    "kernel,include_self,temperature",
    [("cosine", True, 0.1), ("cosine", False, 0.1), ("softmax", True, 0.1), ("softmax", False, 0.01)],
)
def test_full_precision_against_float64(dtype, atol, kl_atol, kernel, include_self, temperature) -> None:
    from d2sm_loss.ops.reference import similarity_kl_reference
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    x, y = features(3, 1500, 130, dtype, seed=5, device="cuda")  # 130 features: two D chunks of the gradient
    kwargs = dict(similarity=kernel, temperature=temperature, include_self=include_self)
    upstream = torch.randn(3, 1500, device="cuda", dtype=torch.float64)
    out, grad = value_and_grad(similarity_kl_triton, x, y, upstream, **kwargs)
    ref, ref_grad = value_and_grad(similarity_kl_reference, x.double(), y.double(), upstream, **kwargs)
    # The softmax kernel's log-similarity (c - 1) / T turns a float32 rounding of c into an
    # error 1/T times larger: the KL's relative bound (set at T = 0.1) grows by 0.1 / T.
    conditioning = max(1.0, 0.1 / temperature) if kernel == "softmax" and dtype == torch.float32 else 1.0
    torch.testing.assert_close(out.double(), ref, rtol=atol * conditioning, atol=kl_atol)
    scale = ref_grad.abs().max().item()  # no floor: the gradients are far below 1
    assert scale > 0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=atol, atol=atol * scale)


@pytest.mark.parametrize("kernel,include_self", [("cosine", True), ("softmax", False)])
def test_large_d_against_float64(kernel: str, include_self: bool) -> None:
    """D = 5000: the backward's gradient columns come in many chunks (128 each), every
    one recomputing the similarity tiles. Rows share an 8-dimensional component so that
    the cosines spread (std about 0.28) instead of sitting near 0 as for independent
    5000-dimensional vectors."""
    from d2sm_loss.ops.reference import similarity_kl_reference
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    gen = torch.Generator(device="cuda").manual_seed(7)
    groups, n, d = 2, 300, 5000
    basis = torch.randn(groups, 8, d, device="cuda", generator=gen)
    y = torch.randn(groups, n, 8, device="cuda", generator=gen) @ basis / 8**0.5
    y = y + 0.5 * torch.randn(groups, n, d, device="cuda", generator=gen)
    x = y + 0.5 * torch.randn(groups, n, d, device="cuda", generator=gen)
    kwargs = {"kernel": kernel, "temperature": 0.1, "include_self": include_self}
    upstream = torch.randn(groups, n, device="cuda", dtype=torch.float64, generator=gen)
    out, grad = value_and_grad(similarity_kl_triton, x, y, upstream, allow_tf32=False, **kwargs)
    ref, ref_grad = value_and_grad(similarity_kl_reference, x.double(), y.double(), upstream, **kwargs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=5e-6)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=5e-5 * scale)


# --- implementation="auto" and its self-check ---------------------------------------------


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_auto_first_call_without_grad_still_picks_triton(fresh_self_checks, context) -> None:
    """The first ``auto`` call of a process may come from a validation pass: the
    self-check must still run (with gradients enabled inside), pass and be cached."""
    functional = fresh_self_checks
    x, y = features(2, 64, 48, torch.float32, seed=11, device="cuda")
    guard = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with guard:
            value = functional.similarity_kl(x, y, implementation="auto")
    assert not [w for w in caught if "self-check" in str(w.message)], [str(w.message) for w in caught]
    assert torch.isfinite(value)
    assert functional._SELF_CHECKS.get(functional._launch_configuration(x.device, torch.float32, 48)) is True, (
        functional._SELF_CHECKS
    )
    limit = functional.TRITON_AUTO_MAX_FEATURES
    assert functional.resolve_implementation("auto", x.device, 48) == "triton"
    assert functional.resolve_implementation("auto", x.device, limit) == "triton"
    assert functional.resolve_implementation("auto", x.device, limit + 1) == "streaming"
    assert functional.resolve_implementation("auto", x.device, 100352) == "streaming"  # paper(): image granularity


def test_self_check_passes_with_tf32_enabled(fresh_self_checks) -> None:
    """With TF32 allowed (legacy switch) the self-check still runs exact float32 products
    and passes; the package reads the switch through ``d2sm_loss._compat.tf32_allowed``."""
    from d2sm_loss._compat import tf32_allowed

    functional = fresh_self_checks
    device = torch.device("cuda", torch.cuda.current_device())
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert tf32_allowed()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert functional._triton_self_check(device) is True
        assert not [w for w in caught if "self-check" in str(w.message)], [str(w.message) for w in caught]
        assert functional.resolve_implementation("auto", device, 64) == "triton"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


_NEW_TF32_API = """
import warnings
import torch
warnings.filterwarnings("error", message=".*self-check.*")
torch.backends.cuda.matmul.fp32_precision = "tf32"
from d2sm_loss.functional import _SELF_CHECKS, similarity_kl
from d2sm_loss._compat import tf32_allowed
assert tf32_allowed()
x = torch.randn(2, 64, 48, device="cuda", requires_grad=True)
y = torch.randn(2, 64, 48, device="cuda")
similarity_kl(x, y, implementation="triton").backward()
with torch.no_grad():
    similarity_kl(x, y, implementation="auto")
checked = {key[3]: passed for key, passed in _SELF_CHECKS.items() if key[0] == x.device}
assert checked.get("tf32") is True, _SELF_CHECKS  # keys: (device, dtype, block config, precision)
print("ok")
"""


def test_new_tf32_api_does_not_break_triton() -> None:
    """``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (the API since torch 2.9)
    makes ``torch.get_float32_matmul_precision()`` raise; the Triton path and the
    self-check must not depend on it (``d2sm_loss._compat.tf32_allowed``). In a
    subprocess: the setting is process-wide."""
    proc = subprocess.run([sys.executable, "-c", _NEW_TF32_API], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False, env=subprocess_env())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_float32_g8_n16384_within_2gb() -> None:
    """Forward + backward at G = 8, N = 16384, D = 256, float32, within 2 GB
    (2e9 bytes) above the inputs."""

    x, y = features(8, 16384, 256, torch.float32, seed=3, device="cuda")
    x.requires_grad_(True)
    extra = _extra_memory_of_forward_backward(x, y, similarity="cosine", temperature=0.1, include_self=True)
    assert torch.isfinite(x.grad).all()
    assert extra <= 2e9, extra


def _extra_memory_of_forward_backward(x: torch.Tensor, y: torch.Tensor, **kwargs) -> int:
    """Peak CUDA memory above what is allocated before the call, of one Triton forward +
    backward (after a first, compiling, call). Leaves the gradient in ``x.grad``."""
    from d2sm_loss.ops.triton_kernels import similarity_kl_triton

    similarity_kl_triton(x, y, **kwargs).sum().backward()  # compile
    x.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    similarity_kl_triton(x, y, **kwargs).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def test_peak_memory_grows_linearly() -> None:

    d = 256
    extra: dict[int, int] = {}
    for n in (2048, 4096, 8192, 16384):
        x, y = features(1, n, d, torch.float32, seed=n, device="cuda")
        x, y = x.half().requires_grad_(True), y.half()
        extra[n] = _extra_memory_of_forward_backward(x, y, similarity="softmax", temperature=0.1, include_self=False)
        del x, y
    # Linear: x8 from 2048 to 16384 rows (quadratic would be x64); slack for allocator rounding.
    assert extra[16384] <= 12 * extra[2048], extra
    # Far below one N x N float32 matrix (1 GiB at N = 16384).
    assert extra[16384] < 4 * 16384 * 16384 // 16, extra
    # About 6 bytes per feature (float32 gradient buffer + float16 copy) plus O(N) stats.
    assert extra[16384] < 16 * 16384 * d + (8 << 20), extra

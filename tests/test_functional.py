"""similarity_kl: values against a plain float64 loop, gradients, reductions, errors."""

import math

import pytest
import torch

from d2sm_loss.functional import resolve_implementation, similarity_kl
from d2sm_loss.ops.reference import COSINE_ETA, NORM_EPS, similarity_kl_reference


def loop_kl(x, y, kernel, temperature, include_self):
    """KL(p_clean(.|i) || p_restored(.|i)) with Python loops over float64 values."""
    x, y = x.double().tolist(), y.double().tolist()

    def unit(v):
        n = max(math.sqrt(sum(a * a for a in v)), NORM_EPS)
        return [a / n for a in v]

    def log_s(c):
        return math.log((1 + c) / 2 + COSINE_ETA) if kernel == "cosine" else (c - 1) / temperature

    def cond(rows, i):
        ui = unit(rows[i])
        logits = {j: log_s(sum(a * b for a, b in zip(ui, unit(r)))) for j, r in enumerate(rows) if include_self or j != i}
        top = max(logits.values())
        z = sum(math.exp(v - top) for v in logits.values())
        return {j: math.exp(v - top) / z for j, v in logits.items()}

    out = []
    for i in range(len(x)):
        px, py = cond(x, i), cond(y, i)
        out.append(sum(p * (math.log(p) - math.log(px[j])) for j, p in py.items() if p > 0))
    return torch.tensor(out, dtype=torch.float64)


SHAPES = [(1, 2, 3), (1, 7, 5), (3, 9, 17), (2, 13, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", ["cosine", "softmax"])
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("implementation", ["reference", "torch"])
def test_matches_loop_reference(shape, kernel, include_self, implementation):
    g = torch.Generator().manual_seed(hash((shape, kernel, include_self)) % 2**31)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(shape, generator=g, dtype=torch.float64)
    x[0, -1] = 0.0  # an all-zero row
    if shape[1] > 3:
        x[0, 1] = x[0, 2]  # a duplicated row
    rows = similarity_kl(x, y, kernel=kernel, temperature=0.3, include_self=include_self,
                         reduction="none", implementation=implementation)
    expected = torch.stack([loop_kl(x[k], y[k], kernel, 0.3, include_self) for k in range(shape[0])])
    torch.testing.assert_close(rows, expected, rtol=1e-9, atol=1e-12)
    assert (rows >= -1e-12).all()


@pytest.mark.parametrize("kernel", ["cosine", "softmax"])
@pytest.mark.parametrize("include_self", [True, False])
def test_reference_gradcheck(kernel, include_self):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: similarity_kl(a, y, kernel=kernel, temperature=0.5, include_self=include_self,
                                reduction="none", implementation="reference"), (x,))


def test_reductions_and_2d_input():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(11, 6, generator=g), torch.randn(11, 6, generator=g)
    rows = similarity_kl(x, y, reduction="none")
    assert rows.shape == (11,) and rows.dtype == torch.float32
    torch.testing.assert_close(similarity_kl(x, y, reduction="mean"), rows.mean())
    torch.testing.assert_close(similarity_kl(x, y, reduction="sum"), rows.sum())
    grouped = similarity_kl(torch.stack([x, y]), torch.stack([y, x]), reduction="none")
    assert grouped.shape == (2, 11)
    torch.testing.assert_close(grouped[0], rows)


def test_gradient_flows_to_restored_only():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=g, requires_grad=True)
    y = torch.randn(5, 4, generator=g, requires_grad=True)
    similarity_kl(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert y.grad is None


def test_identical_inputs_give_zero_loss_and_gradient():
    x = torch.randn(3, 9, 7, requires_grad=True)
    loss = similarity_kl(x, x.detach().clone(), kernel="softmax")
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert x.grad.abs().max() < 1e-6


def test_half_precision_inputs_accumulate_in_float32():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    full = similarity_kl(x, y, reduction="none")
    for dtype in (torch.float16, torch.bfloat16):
        half = similarity_kl(x.to(dtype), y.to(dtype), reduction="none")
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, full, rtol=5e-2, atol=5e-3)


def test_softmax_small_temperature_without_diagonal_stays_finite():
    x = torch.eye(4, 6) * 3.0  # orthogonal rows: every off-diagonal cosine is 0
    y = torch.randn(4, 6)
    for impl in ("reference", "torch"):
        value = similarity_kl(x.requires_grad_(), y, kernel="softmax", temperature=1e-3,
                              include_self=False, implementation=impl)
        assert torch.isfinite(value)


def test_auto_picks_streaming_torch_on_cpu():
    assert resolve_implementation("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "kwargs, args, error, match",
    [
        ({}, (torch.randn(3), torch.randn(3)), ValueError, "restored must have shape"),
        ({}, (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)), ValueError, "restored must have shape"),
        ({}, (torch.randn(4, 3), torch.randn(5, 3)), ValueError, "same shape"),
        ({}, (torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long)), TypeError, "floating-point"),
        ({}, (torch.randn(4, 3), torch.randn(4, 3, device="meta")), ValueError, "same device"),
        ({}, ([[1.0]], torch.randn(1, 1)), TypeError, "must be tensors"),
        ({"kernel": "gauss"}, None, ValueError, "kernel must be one of"),
        ({"kernel": "softmax", "temperature": 0.0}, None, ValueError, "temperature"),
        ({"kernel": "softmax", "temperature": float("inf")}, None, ValueError, "temperature"),
        ({"kernel": "softmax", "temperature": True}, None, ValueError, "temperature"),
        ({"include_self": 1}, None, TypeError, "include_self must be a bool"),
        ({"reduction": "avg"}, None, ValueError, "reduction must be one of"),
        ({"implementation": "cuda"}, None, ValueError, "implementation must be one of"),
        ({"include_self": False}, (torch.randn(1, 3), torch.randn(1, 3)), ValueError, "at least 2 rows"),
    ],
)
def test_bad_arguments(kwargs, args, error, match):
    args = args or (torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(error, match=match):
        similarity_kl(*args, **kwargs)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="implementation='triton' needs CUDA tensors"):
        similarity_kl(torch.randn(4, 3), torch.randn(4, 3), implementation="triton")


def test_reference_is_what_the_ops_layer_exports():
    x, y = torch.randn(1, 5, 3), torch.randn(1, 5, 3)
    torch.testing.assert_close(similarity_kl(x, y, reduction="none", implementation="reference"),
                               similarity_kl_reference(x, y))


def test_triton_self_check_passes_under_the_interpreter(monkeypatch):
    import d2sm_loss.functional as functional

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter path")
    monkeypatch.setattr(functional, "_SELF_CHECKS", {})
    assert functional._triton_self_check(torch.device("cpu")) is True


def test_auto_falls_back_to_streaming_when_triton_self_check_fails(monkeypatch):
    import d2sm_loss.functional as functional
    from d2sm_loss.ops import triton_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("kernel does not compile here")

    monkeypatch.setattr(functional, "_SELF_CHECKS", {})
    monkeypatch.setattr(triton_kernels, "similarity_kl_triton", broken)
    with pytest.warns(RuntimeWarning, match="failed a self-check.*kernel does not compile here"):
        assert functional._triton_self_check(torch.device("cpu")) is False
    assert functional._triton_self_check(torch.device("cpu")) is False  # checked once, cached


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_triton_self_check_runs_under_no_grad_and_inference_mode(monkeypatch, context):
    """A first call from a validation pass must not turn Triton off for good."""
    import d2sm_loss.functional as functional

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter path")
    monkeypatch.setattr(functional, "_SELF_CHECKS", {})
    with context():
        assert functional._triton_self_check(torch.device("cpu")) is True


def test_self_check_out_of_memory_is_not_cached(monkeypatch):
    import d2sm_loss.functional as functional
    from d2sm_loss.ops import triton_kernels

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(functional, "_SELF_CHECKS", {})
    monkeypatch.setattr(triton_kernels, "similarity_kl_triton", out_of_memory)
    assert functional._triton_self_check(torch.device("cpu")) is False
    assert torch.device("cpu") not in functional._SELF_CHECKS


def test_auto_keeps_wide_rows_on_the_streaming_path(monkeypatch):
    import d2sm_loss.functional as functional

    monkeypatch.setattr(functional, "_triton_error", lambda: None)
    monkeypatch.setattr(functional, "_triton_self_check", lambda device: True)
    cuda = torch.device("cuda", 0)
    limit = functional.TRITON_AUTO_MAX_FEATURES
    assert functional.resolve_implementation("auto", cuda, limit) == "triton"
    assert functional.resolve_implementation("auto", cuda, limit + 1) == "torch"
    assert functional.resolve_implementation("auto", torch.device("cpu"), 16) == "torch"


def test_tf32_setting_is_read_through_either_api():
    from d2sm_loss._compat import tf32_allowed

    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API: the legacy getter raises now
        assert tf32_allowed() is True
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert tf32_allowed() is False
    finally:
        torch.backends.cuda.matmul.fp32_precision = before

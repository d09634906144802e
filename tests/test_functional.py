"""similarity_kl: every implementation against a float64 oracle (one parametrised agreement
test, tolerances per dtype in ``helpers.TOLERANCES``), gradcheck, reductions, dispatch, errors."""

import contextlib

import pytest
import torch

from d2sm_loss.functional import resolve_implementation, similarity_kl
from d2sm_loss.ops.reference import similarity_kl_reference

from helpers import (
    triton_skip_reason,
)


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
    loss = similarity_kl(x, x.detach().clone(), similarity="softmax")
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
    for impl in ("reference", "streaming"):
        value = similarity_kl(x.requires_grad_(), y, similarity="softmax", temperature=1e-3,
                              include_self=False, implementation=impl)
        assert torch.isfinite(value)


def test_auto_picks_streaming_torch_on_cpu():
    assert resolve_implementation("auto", torch.device("cpu")) == "streaming"


@pytest.mark.parametrize(
    "kwargs, args, error, match",
    [
        ({}, (torch.randn(3), torch.randn(3)), ValueError, "restored must have shape"),
        ({}, (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)), ValueError, "restored must have shape"),
        ({}, (torch.randn(4, 3), torch.randn(5, 3)), ValueError, "same shape"),
        ({}, (torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long)), TypeError, "floating-point"),
        ({}, (torch.randn(4, 3), torch.randn(4, 3, device="meta")), ValueError, "same device"),
        ({}, ([[1.0]], torch.randn(1, 1)), TypeError, "must be tensors"),
        ({"similarity": "gauss"}, None, ValueError, "similarity must be one of"),
        ({"similarity": "softmax", "temperature": 0.0}, None, ValueError, "temperature"),
        ({"similarity": "softmax", "temperature": float("inf")}, None, ValueError, "temperature"),
        ({"similarity": "softmax", "temperature": True}, None, TypeError, "temperature"),
        ({"include_self": 1}, None, TypeError, "include_self must be a bool"),
        ({"reduction": "avg"}, None, ValueError, "reduction must be one of"),
        ({"implementation": "cuda"}, None, ValueError, "implementation must be one of"),
        ({"include_self": False}, (torch.randn(1, 3), torch.randn(1, 3)), ValueError, "at least 3 rows"),
        ({"include_self": False}, (torch.randn(2, 3), torch.randn(2, 3)), ValueError, "identically 0"),
        ({"include_self": False}, (torch.randn(4, 2, 3), torch.randn(4, 2, 3)), ValueError, "identically 0"),
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


def test_auto_falls_back_to_streaming_when_triton_self_check_fails(fresh_self_checks, monkeypatch):
    from d2sm_loss.ops import triton_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("kernel does not compile here")

    functional = fresh_self_checks
    monkeypatch.setattr(triton_kernels, "similarity_kl_triton", broken)
    with pytest.warns(RuntimeWarning, match="failed a self-check.*kernel does not compile here"):
        assert functional._triton_self_check(torch.device("cpu")) is False
    assert functional._triton_self_check(torch.device("cpu")) is False  # checked once, cached


@pytest.mark.parametrize("context", [contextlib.nullcontext, torch.no_grad, torch.inference_mode])
def test_triton_self_check_passes_under_the_interpreter(fresh_self_checks, context):
    """Also when the first call comes from a validation pass: a self-check that failed there
    would turn Triton off for good."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter path")
    with context():
        assert fresh_self_checks._triton_self_check(torch.device("cpu")) is True


def test_self_check_out_of_memory_is_not_cached(fresh_self_checks, monkeypatch):
    from d2sm_loss.ops import triton_kernels

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    functional = fresh_self_checks
    monkeypatch.setattr(triton_kernels, "similarity_kl_triton", out_of_memory)
    assert functional._triton_self_check(torch.device("cpu")) is False
    assert not functional._SELF_CHECKS


def test_auto_keeps_wide_rows_on_the_streaming_path(monkeypatch):
    import d2sm_loss.functional as functional

    monkeypatch.setattr(functional, "_triton_error", lambda: None)
    monkeypatch.setattr(functional, "_triton_self_check", lambda *args, **kwargs: True)
    cuda = torch.device("cuda", 0)
    limit = functional.TRITON_AUTO_MAX_FEATURES
    assert functional.resolve_implementation("auto", cuda, limit) == "triton"
    assert functional.resolve_implementation("auto", cuda, limit + 1) == "streaming"
    assert functional.resolve_implementation("auto", torch.device("cpu"), 16) == "streaming"


def test_tf32_setting_is_read_through_either_api():
    from d2sm_loss._compat import tf32_allowed

    try:
        before = torch.backends.cuda.matmul.fp32_precision
    except AttributeError:  # torch < 2.9: only the legacy switch, read by the same function
        pytest.skip(f"torch {torch.__version__} has no torch.backends.cuda.matmul.fp32_precision (new in torch 2.9)")
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API: the legacy getter raises now
        assert tf32_allowed() is True
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert tf32_allowed() is False
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


# --- the Triton self-check, per launch configuration --------------------------------------


@pytest.fixture
def auto_on_cpu(fresh_self_checks, monkeypatch):
    """``implementation="auto"`` treating the CPU as a GPU (the kernels run through the
    interpreter), with every self-check launch recorded as (dtype, D, allow_tf32)."""
    if triton_skip_reason():
        pytest.skip(triton_skip_reason())
    from d2sm_loss.ops import triton_kernels

    functional = fresh_self_checks
    launches = []
    original = triton_kernels.similarity_kl_triton

    def recorded(x, y, **kwargs):
        launches.append((x.dtype, x.shape[-1], kwargs.get("allow_tf32")))
        return original(x, y, **kwargs)

    monkeypatch.setattr(triton_kernels, "similarity_kl_triton", recorded)
    monkeypatch.setattr(functional, "_gpu", lambda device: True)
    monkeypatch.setattr(functional, "_triton_error", lambda: None)
    return functional, launches


def test_the_self_check_runs_once_per_launch_configuration(auto_on_cpu, monkeypatch):
    from d2sm_loss.ops import triton_kernels

    functional, launches = auto_on_cpu
    cpu = torch.device("cpu")
    resolve = functional.resolve_implementation
    assert resolve("auto", cpu, 20, torch.float32) == "triton"
    assert launches == [(torch.float32, 20, False)] * 2  # both similarities, on rows of the real width
    assert resolve("auto", cpu, 24, torch.float32) == "triton"  # the same block configuration: cached
    assert len(launches) == 2
    assert resolve("auto", cpu, 10, torch.float32) == "triton"  # another block configuration (BLOCK_K 16)
    assert launches[2:] == [(torch.float32, 10, False)] * 2
    assert resolve("auto", cpu, 20, torch.float64) == "triton"  # another dtype
    assert launches[4:] == [(torch.float64, 20, False)] * 2
    # TF32 switched on changes the products, hence the configuration (the interpreter computes
    # in IEEE whatever it is asked: simulated by the precision the launch would use).
    monkeypatch.setattr(triton_kernels, "_dot_precision", lambda dtype, allow_tf32=None: "tf32" if allow_tf32 in (None, True) and dtype == torch.float32 else "ieee")
    assert resolve("auto", cpu, 20, torch.float32) == "triton"
    assert launches[6:] == [(torch.float32, 20, True)] * 2
    assert len(functional._SELF_CHECKS) == 4 and all(functional._SELF_CHECKS.values())


def test_a_configuration_that_disagrees_falls_back_alone(auto_on_cpu, monkeypatch):
    """Wrong numbers (not only a failed launch) in one configuration turn Triton off for that
    configuration only, with a warning that names it."""
    from d2sm_loss.ops import triton_kernels

    functional, _ = auto_on_cpu
    checked = triton_kernels.similarity_kl_triton

    def wrong_in_float16(x, y, **kwargs):
        out = checked(x, y, **kwargs)
        return out * 1.2 if x.dtype == torch.float16 else out

    monkeypatch.setattr(triton_kernels, "similarity_kl_triton", wrong_in_float16)
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="self-check on cpu for torch.float16 rows of 20 features"):
        assert functional.resolve_implementation("auto", cpu, 20, torch.float16) == "streaming"
    assert functional.resolve_implementation("auto", cpu, 20, torch.float32) == "triton"
    assert functional.resolve_implementation("auto", cpu, 20, torch.float16) == "streaming"  # cached, no new warning


def test_similarity_kl_checks_the_dtype_it_launches(auto_on_cpu):
    functional, launches = auto_on_cpu
    x, y = torch.randn(2, 21, 12, dtype=torch.float64), torch.randn(2, 21, 12, dtype=torch.float64)
    functional.similarity_kl(x, y, implementation="auto")
    assert launches[:2] == [(torch.float64, 12, False)] * 2  # the self-check, in float64

"""similarity_kl: every implementation against a float64 oracle (one parametrised agreement
test, tolerances per dtype in ``helpers.TOLERANCES``), gradcheck, reductions, dispatch, errors."""

import contextlib
import functools
import itertools
import zlib
from typing import NamedTuple

import pytest
import torch

from d2sm_loss.functional import REDUCTIONS, resolve_implementation, similarity_kl
from d2sm_loss.ops.reference import similarity_kl_reference

from helpers import (
    DEVICE,
    TOLERANCES,
    TRITON_INTERPRETED,
    assert_close,
    features,
    kl_gradient,
    loop_kl,
    triton_skip_reason,
    upstream,
    value_and_grad,
)


class Problem(NamedTuple):
    """One input of the agreement test. ``interpreter``: whether the Triton interpreter runs
    it too (on a GPU, Triton runs every problem)."""

    shape: tuple[int, ...]  # (N, D) or (G, N, D)
    dtype: torch.dtype
    reduction: str
    temperature: float  # of the softmax kernel
    interpreter: bool = True


F64, F32 = torch.float64, torch.float32
PROBLEMS = [
    # Small odd shapes.
    *(Problem(shape, F64, "none", 0.3) for shape in ((1, 7, 5), (3, 9, 17), (2, 13, 4))),
    # N and D on both sides of the interpreter's 16-row and 32-column tiles, one or three
    # groups; N = 1 has only the diagonal, N = 2 without it one column.
    *(Problem((g, n, d), F64, "none", 0.1) for n, d, g in itertools.product((1, 2, 33, 70), (3, 17, 65), (1, 3))
      if (n, d, g) != (70, 65, 3)),
    # Every reduction, for (G, N, D) and (N, D) inputs.
    *(Problem(shape, F64, reduction, 0.2) for shape in ((3, 10, 20), (10, 20)) for reduction in REDUCTIONS),
    # float32, small enough for the interpreter.
    *(Problem(shape, F32, reduction, 0.1) for shape, reduction in (((2, 21, 40), "none"), ((33, 17), "sum"))),
    # float32 and every reduction at larger shapes: too slow for the interpreter.
    *(Problem(shape, dtype, reduction, 0.1, interpreter=False)
      for shape in ((70, 17), (3, 33, 65)) for dtype in (F64, F32) for reduction in REDUCTIONS
      if (shape, dtype, reduction) != ((3, 33, 65), F64, "none")),
    # float16 / bfloat16 inputs: float32 accumulation, gradients in the input dtype.
    *(Problem((2, 35, 40), dtype, "none", 0.1) for dtype in (torch.float16, torch.bfloat16)),
]


def _agreement_cases():
    for implementation, problem, kernel, include_self in itertools.product(
        ("reference", "streaming", "triton"), PROBLEMS, ("cosine", "softmax"), (True, False)
    ):
        if problem.shape[-2] < 2 and not include_self:
            continue  # nothing to compare (an error: test_bad_arguments)
        kernel_id = f"softmax{problem.temperature}" if kernel == "softmax" else kernel
        shape_id = "x".join(map(str, problem.shape))
        dtype_id = str(problem.dtype).removeprefix("torch.")
        self_id = "self" if include_self else "noself"
        yield pytest.param(implementation, problem, kernel, include_self,
                           id=f"{implementation}-{kernel_id}-{self_id}-{shape_id}-{dtype_id}-{problem.reduction}")


@functools.lru_cache(maxsize=None)
def _oracle(problem: Problem, kernel: str, include_self: bool):
    """Inputs, incoming gradient, and the float64 oracle's value and gradient (on the CPU)."""
    *lead, n, d = problem.shape
    seed = zlib.crc32(repr(problem[:3]).encode())
    # Zero and duplicated rows, except in float16 / bfloat16 (a zero row's gradient overflows).
    special_rows = problem.dtype in (F64, F32)
    x, y = features(lead[0] if lead else 1, n, d, problem.dtype, seed=seed, special_rows=special_rows)
    if not lead:
        x, y = x[0], y[0]
    out_shape = problem.shape[:-1] if problem.reduction == "none" else ()
    weight = upstream(out_shape, seed=seed + 1)
    x3, y3 = x.double().reshape(-1, n, d), y.double().reshape(-1, n, d)  # the rounded inputs
    rows = torch.stack([loop_kl(a, b, kernel, problem.temperature, include_self) for a, b in zip(x3, y3)])
    if problem.reduction == "none":
        value, row_weight = rows.reshape(out_shape), weight.reshape(rows.shape)
    elif problem.reduction == "sum":
        value, row_weight = rows.sum(), weight.expand(rows.shape)
    else:
        value, row_weight = rows.mean(), (weight / rows.numel()).expand(rows.shape)
    grad = torch.stack([kl_gradient(a, b, w, kernel, problem.temperature, include_self)
                        for a, b, w in zip(x3, y3, row_weight)]).reshape(x.shape)
    return x, y, weight, value, grad


@pytest.mark.parametrize("implementation,problem,kernel,include_self", list(_agreement_cases()))
def test_implementations_agree_with_float64_oracle(implementation, problem, kernel, include_self):
    """Every implementation, through :func:`similarity_kl`, against the float64 loop (value)
    and the closed-form gradient, within the dtype's tolerances (``helpers.TOLERANCES``).
    float64 and float32 inputs hold an all-zero restored row, an all-zero clean row and
    duplicated rows where N >= 3."""
    if implementation == "triton":
        if triton_skip_reason():
            pytest.skip(triton_skip_reason())
        if TRITON_INTERPRETED and not problem.interpreter:
            pytest.skip("too slow for the Triton interpreter (runs on a GPU)")
    x, y, weight, expected, expected_grad = _oracle(problem, kernel, include_self)
    value, grad = value_and_grad(
        similarity_kl, x.to(DEVICE), y.to(DEVICE), weight.to(DEVICE), similarity=kernel, temperature=problem.temperature,
        include_self=include_self, reduction=problem.reduction, implementation=implementation,
    )
    assert value.dtype == (F64 if problem.dtype == F64 else F32) and grad.dtype == problem.dtype
    tol = TOLERANCES[problem.dtype]
    assert_close(value, expected, tol.value, "value")
    assert_close(grad, expected_grad, tol.grad, "gradient")
    assert (value >= -tol.value.atol).all()  # a KL divergence is not negative


@pytest.mark.parametrize("kernel", ["cosine", "softmax"])
@pytest.mark.parametrize("include_self", [True, False])
def test_reference_gradcheck(kernel, include_self):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: similarity_kl(a, y, similarity=kernel, temperature=0.5, include_self=include_self,
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
    assert torch.device("cpu") not in functional._SELF_CHECKS


def test_auto_keeps_wide_rows_on_the_streaming_path(monkeypatch):
    import d2sm_loss.functional as functional

    monkeypatch.setattr(functional, "_triton_error", lambda: None)
    monkeypatch.setattr(functional, "_triton_self_check", lambda device: True)
    cuda = torch.device("cuda", 0)
    limit = functional.TRITON_AUTO_MAX_FEATURES
    assert functional.resolve_implementation("auto", cuda, limit) == "triton"
    assert functional.resolve_implementation("auto", cuda, limit + 1) == "streaming"
    assert functional.resolve_implementation("auto", torch.device("cpu"), 16) == "streaming"


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

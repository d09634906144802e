"""The contract every implementation of the statistic goes through (as torchmetrics'
``MetricTester`` does for metrics): ``tests/test_contract.py`` runs each check below for each
:class:`Implementation` in :data:`IMPLEMENTATIONS`, and the module against its function.

Checks, each against an oracle written independently of :mod:`d2sm_loss.ops`:

- :func:`check_oracle`: value and gradient against the float64 oracle of ``helpers``
  (:func:`~helpers.loop_kl`, :func:`~helpers.kl_gradient`) on the same rounded inputs, over
  dtypes, reductions and awkward (non-power-of-two) shapes, within ``helpers.TOLERANCES``;
  float64 and float32 inputs hold an all-zero restored row, an all-zero clean row and
  duplicated rows where N >= 3.
- :func:`check_gradcheck`: ``torch.autograd.gradcheck`` in float64.
- :func:`check_second_order`: ``gradgradcheck``, and the Hessian-vector product and the
  derivative with respect to the incoming gradient equal to those of the exact torch path
  (plain autograd of the definition) to 1e-12 of the largest entry, with an all-zero row.
- :func:`check_compile`: ``torch.compile`` (``aot_eager``: cheap on a CPU) gives the eager
  value and gradient.

An implementation maps ``(x, y, similarity=, temperature=, include_self=, reduction=)`` to the
statistic of the rows of ``x`` (restored, receives the gradient) and ``y`` (clean). The queue
path's statistic is over the call's rows followed by the rows already in the queue
(:data:`QUEUE_ROWS` of them, pushed by earlier calls); its oracle is over those rows, with the
gradient taken for the call's rows.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import pytest
import torch
from torch import Tensor

from d2sm_loss.functional import REDUCTIONS, similarity_kl
from d2sm_loss.ops.reference import similarity_kl_reference
from d2sm_loss.queue import FeatureQueue

from helpers import (
    DEVICE,
    TOLERANCES,
    TRITON_INTERPRETED,
    Tolerance,
    assert_close,
    features,
    kl_gradient,
    loop_kl,
    second_order,
    triton_skip_reason,
    upstream,
    value_and_grad,
)

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
#: The (similarity, include_self) pairs every check runs.
MODES = [("cosine", True), ("cosine", False), ("softmax", True), ("softmax", False)]


class Problem(NamedTuple):
    """One input of :func:`check_oracle`."""

    shape: tuple[int, ...]  # (N, D) or (G, N, D)
    dtype: torch.dtype
    reduction: str
    temperature: float  # of the softmax similarity


# Small odd shapes; N and D on both sides of the interpreter's 16-row and 32-column tiles,
# one or three groups (N = 1 has only the diagonal: N <= 2 without it is an error); every
# reduction for (G, N, D) and (N, D); float32, float16 and bfloat16 (float32 accumulation,
# gradients in the input dtype).
FULL_PROBLEMS = [
    *(Problem(shape, F64, "none", 0.3) for shape in ((1, 7, 5), (3, 9, 17), (2, 13, 4))),
    *(Problem((g, n, d), F64, "none", 0.1) for n, d, g in itertools.product((1, 2, 33, 70), (3, 17, 65), (1, 3))
      if (n, d, g) != (70, 65, 3)),
    *(Problem(shape, F64, reduction, 0.2) for shape in ((3, 10, 20), (10, 20)) for reduction in REDUCTIONS),
    *(Problem(shape, F32, reduction, 0.1) for shape, reduction in (((2, 21, 40), "none"), ((33, 17), "sum"))),
    *(Problem(shape, dtype, reduction, 0.1)
      for shape in ((70, 17), (3, 33, 65)) for dtype in (F64, F32) for reduction in REDUCTIONS
      if (shape, dtype, reduction) != ((3, 33, 65), F64, "none")),
    *(Problem((2, 35, 40), dtype, "none", 0.1) for dtype in (F16, BF16)),
]
#: What the Triton interpreter (slow) runs: the same kinds of problem, fewer and smaller.
INTERPRETER_PROBLEMS = [
    *(Problem(shape, F64, "none", 0.3) for shape in ((1, 7, 5), (3, 9, 17), (2, 13, 4))),
    *(Problem((g, n, d), F64, "none", 0.1) for n, d, g in ((1, 3, 1), (2, 17, 3), (33, 3, 1), (33, 65, 1), (70, 17, 1))),
    *(Problem((10, 20), F64, reduction, 0.2) for reduction in REDUCTIONS),
    *(Problem(shape, F32, reduction, 0.1) for shape, reduction in (((2, 21, 40), "none"), ((33, 17), "sum"))),
    *(Problem((2, 35, 40), dtype, "none", 0.1) for dtype in (F16, BF16)),
]
#: The queue path takes (B, D) rows of one group: batches below, at and above the queue's
#: row count, every reduction, float64 and float32.
QUEUE_PROBLEMS = [
    *(Problem((n, d), F64, "none", 0.1) for n, d in ((1, 3), (2, 17), (5, 13), (19, 65))),
    *(Problem((9, 20), F64, reduction, 0.2) for reduction in REDUCTIONS),
    *(Problem((10, 17), F32, reduction, 0.1) for reduction in REDUCTIONS),
]
#: Rows in the queue before the call: not a multiple of its blocks, wrapped around once.
QUEUE_SIZE, QUEUE_ROWS = 11, 11


@functools.lru_cache(maxsize=None)
def _filled_queue(similarity: str, temperature: float, include_self: bool, dtype: torch.dtype, width: int,
                  device: str) -> FeatureQueue:
    """A queue of :data:`QUEUE_SIZE` rows of ``width`` features filled by earlier calls
    (15 rows pushed: it has wrapped around), in ``dtype`` (at least float32). Calls that do
    not push leave it as it is, so one is built per configuration."""
    queue = FeatureQueue(QUEUE_SIZE, similarity=similarity, temperature=temperature, include_self=include_self)
    queue = queue.to(device=device, dtype=dtype)
    for batch, seed in ((6, 90), (4, 91), (5, 92)):
        px, py = features(1, batch, width, seed=seed + width)
        px, py = px[0].to(queue.log_x), py[0].to(queue.log_x)
        _, _, _, blocks = queue(px, py)
        queue.push(px, py, blocks)
    assert queue.count == QUEUE_ROWS
    return queue


def _queue_for(x: Tensor, similarity: str = "cosine", temperature: float = 0.1, include_self: bool = True) -> FeatureQueue:
    dtype = torch.promote_types(x.dtype, F32)
    return _filled_queue(similarity, temperature, include_self, dtype, x.shape[-1], str(x.device))


def queue_statistic(x: Tensor, y: Tensor, *, similarity: str, temperature: float, include_self: bool,
                    reduction: str) -> Tensor:
    """The queue path: the statistic of ``x``, ``y`` (B, D) with the rows of a filled queue,
    as :class:`~d2sm_loss.queue.FeatureQueue` computes it incrementally."""
    queue = _queue_for(x, similarity, temperature, include_self)
    kl_batch, kl_queue, count, _ = queue(x, y)
    rows = torch.cat([kl_batch, kl_queue[:QUEUE_ROWS]])
    assert int(count) == rows.shape[0]
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / count}[reduction]


def queue_oracle_rows(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The rows the queue path's statistic is over: the call's, then the queue's."""
    past_x, past_y = _queue_for(x).rows()  # the rows do not depend on the options
    return torch.cat([x, past_x.to(x.dtype)]), torch.cat([y, past_y.to(y.dtype)])


def _through_functional(implementation: str) -> Callable[..., Tensor]:
    return functools.partial(similarity_kl, implementation=implementation)


@dataclass(frozen=True)
class Implementation:
    """One implementation of the statistic and what the contract asks of it."""

    name: str
    statistic: Callable[..., Tensor]
    problems: list[Problem]
    device: str = "cpu"
    #: The rows the oracle sees for a call's ``x``, ``y`` (the call's own by default).
    oracle_rows: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    #: Why a check does not apply (check name -> reason); absent: it runs.
    not_applicable: dict[str, str] = field(default_factory=dict)

    def skip_reason(self, check: str) -> str | None:
        if self.name == "triton" and triton_skip_reason():
            return triton_skip_reason()
        return self.not_applicable.get(check)

    def __call__(self, x: Tensor, y: Tensor, **options) -> Tensor:
        return self.statistic(x, y, **options)


IMPLEMENTATIONS = {
    "reference": Implementation("reference", _through_functional("reference"), FULL_PROBLEMS),
    "streaming": Implementation("streaming", _through_functional("streaming"), FULL_PROBLEMS),
    "triton": Implementation(
        "triton", _through_functional("triton"), INTERPRETER_PROBLEMS if TRITON_INTERPRETED else FULL_PROBLEMS,
        device=DEVICE,
        not_applicable={"compile": "the Triton interpreter does not run under torch.compile; the GPU build is "
                                   "test_triton_compile.py"} if TRITON_INTERPRETED else {},
    ),
    "queue": Implementation(
        "queue", queue_statistic, QUEUE_PROBLEMS, oracle_rows=queue_oracle_rows,
        not_applicable={"compile": "the queue compiles inside the module: test_compile.py (image-queue, "
                                   "patch-queue)"},
    ),
}


def problem_id(problem: Problem) -> str:
    shape = "x".join(map(str, problem.shape))
    return f"{shape}-{str(problem.dtype).removeprefix('torch.')}-{problem.reduction}-t{problem.temperature}"


def oracle_cases(implementation: Implementation):
    """``(problem, similarity, include_self)`` for :func:`check_oracle`, as pytest params."""
    for problem, (similarity, include_self) in itertools.product(implementation.problems, MODES):
        if problem.shape[-2] < 3 and not include_self:
            continue  # nothing to compare, or identically 0 (an error, tested with the bad arguments)
        self_id = "self" if include_self else "noself"
        yield pytest.param(problem, similarity, include_self, id=f"{similarity}-{self_id}-{problem_id(problem)}")


@functools.lru_cache(maxsize=None)
def _oracle(problem: Problem, similarity: str, include_self: bool, oracle_rows=None):
    """Inputs, incoming gradient, and the float64 oracle's value and gradient (on the CPU)."""
    *lead, n, d = problem.shape
    seed = zlib.crc32(repr(problem[:3]).encode())
    # Zero and duplicated rows, except in float16 / bfloat16 (a zero row's gradient overflows).
    x, y = features(lead[0] if lead else 1, n, d, problem.dtype, seed=seed, special_rows=problem.dtype in (F64, F32))
    if not lead:
        x, y = x[0], y[0]
    if oracle_rows is not None:
        all_x, all_y = oracle_rows(x, y)
        all_x, all_y = all_x[None], all_y[None]
    else:
        all_x, all_y = x.reshape(-1, n, d), y.reshape(-1, n, d)
    out_shape = tuple(x.shape[:-1]) if problem.reduction == "none" else ()  # (G, N), or (N,) unbatched
    if oracle_rows is not None and problem.reduction == "none":
        out_shape = tuple(all_x.shape[1:-1])
    weight = upstream(out_shape, seed=seed + 1)
    x3, y3 = all_x.double(), all_y.double()  # the rounded inputs
    rows = torch.stack([loop_kl(a, b, similarity, problem.temperature, include_self) for a, b in zip(x3, y3)])
    if problem.reduction == "none":
        value, row_weight = rows.reshape(out_shape), weight.reshape(rows.shape)
    elif problem.reduction == "sum":
        value, row_weight = rows.sum(), weight.expand(rows.shape)
    else:
        value, row_weight = rows.mean(), (weight / rows.numel()).expand(rows.shape)
    grad = torch.stack([kl_gradient(a, b, w, similarity, problem.temperature, include_self)
                        for a, b, w in zip(x3, y3, row_weight)])
    grad = grad[0, :n] if oracle_rows is not None else grad.reshape(x.shape)  # the call's rows only
    return x, y, weight, value, grad


def check_oracle(implementation: Implementation, problem: Problem, similarity: str, include_self: bool) -> None:
    """Value and gradient against the float64 oracle, within the dtype's tolerances; the
    value's dtype is float64 for float64 inputs, else float32; the gradient's is the input's."""
    x, y, weight, expected, expected_grad = _oracle(problem, similarity, include_self, implementation.oracle_rows)
    device = implementation.device
    xx = x.to(device).requires_grad_(True)
    value = implementation(xx, y.to(device), similarity=similarity, temperature=problem.temperature,
                           include_self=include_self, reduction=problem.reduction)
    (grad,) = torch.autograd.grad(value, xx, weight.to(device, value.dtype))
    assert value.dtype == (F64 if problem.dtype == F64 else F32) and grad.dtype == problem.dtype
    tol = TOLERANCES[problem.dtype]
    assert_close(value, expected, tol.value, "value")
    assert_close(grad, expected_grad, tol.grad, "gradient")
    assert (value >= -tol.value.atol).all()  # a KL divergence is not negative


def _small(groups: int, n: int, d: int, seed: int, implementation: Implementation) -> tuple[Tensor, Tensor]:
    """float64 restored (a leaf requiring grad) and clean features: (G, N, D), or (N, D) for
    an implementation of one group (the queue)."""
    x, y = features(groups, n, d, seed=seed, device=implementation.device)
    if implementation.oracle_rows is not None:
        x, y = x.reshape(-1, d), y.reshape(-1, d)
    return x.requires_grad_(True), y


def check_gradcheck(implementation: Implementation, similarity: str, include_self: bool) -> None:
    x, y = _small(2, 6, 5, 0, implementation)

    def statistic(inp: Tensor) -> Tensor:
        return implementation(inp, y, similarity=similarity, temperature=0.5, include_self=include_self,
                              reduction="none")

    assert torch.autograd.gradcheck(statistic, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def check_second_order(implementation: Implementation, similarity: str, include_self: bool) -> None:
    """gradgradcheck on a small input, then second derivatives (with an all-zero row: entries
    of order 1 / NORM_EPS) equal the exact torch path's on the rows the statistic is over."""
    x, y = _small(2, 7, 5, 3, implementation)

    def statistic(inp: Tensor) -> Tensor:
        return implementation(inp, y, similarity=similarity, temperature=0.5, include_self=include_self,
                              reduction="none")

    # gradgradcheck also differentiates with respect to the incoming gradient.
    assert torch.autograd.gradgradcheck(statistic, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)

    x, y = _small(3, 11, 6, 5, implementation)
    x.data.view(-1, 6)[4] = 0.0
    options = dict(similarity=similarity, temperature=0.2, include_self=include_self)
    rows = implementation(x, y, reduction="none", **options)
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(rows.shape, generator=gen, dtype=F64).to(x.device)
    direction = torch.randn(x.shape, generator=gen, dtype=F64).to(x.device)
    g, hvp, dw = second_order(functools.partial(implementation, reduction="none"), x, y, weight, direction, **options)
    if implementation.oracle_rows is None:
        ref_g, ref_hvp, ref_dw = second_order(similarity_kl_reference, x, y, weight, direction, **options)
    else:  # over the call's rows followed by the queue's (constants)
        all_x, all_y = implementation.oracle_rows(x.detach(), y)
        queue_x = all_x[x.shape[0]:]

        def exact(a: Tensor, b: Tensor, **kwargs) -> Tensor:
            return similarity_kl_reference(torch.cat([a, queue_x]), all_y, **kwargs)

        ref_g, ref_hvp, ref_dw = second_order(exact, x, y, weight, direction, **options)
    assert hvp.abs().max() > 0 and dw.abs().max() > 0
    tol = Tolerance(atol=1e-12, max_rtol=1e-12)
    assert_close(g, ref_g, tol, "first derivative")
    assert_close(hvp, ref_hvp, tol, "Hessian-vector product")
    assert_close(dw, ref_dw, tol, "derivative with respect to the incoming gradient")
    # The ordinary backward (no graph: the fast path) gives the same first derivative.
    (plain_g,) = torch.autograd.grad(implementation(x, y, reduction="none", **options), x, weight)
    assert not plain_g.requires_grad
    assert_close(plain_g, ref_g, Tolerance(atol=1e-12, max_rtol=1e-9), "first derivative without a graph")


def check_compile(implementation: Implementation, similarity: str = "cosine", include_self: bool = True) -> None:
    """The compiled statistic (``aot_eager``, one configuration: compiling is slow) gives the
    eager value and gradient in float32."""
    import torch._dynamo

    x, y = features(2, 13, 9, F32, seed=21, device=implementation.device)
    if implementation.oracle_rows is not None:
        x, y = x[0], y[0]
    options = dict(similarity=similarity, temperature=0.2, include_self=include_self, reduction="sum")
    torch._dynamo.reset()
    try:
        compiled = torch.compile(functools.partial(implementation, **options), backend="aot_eager")
        want = value_and_grad(functools.partial(implementation, **options), x, y)
        got = value_and_grad(compiled, x, y)
    finally:
        torch._dynamo.reset()
    tol = TOLERANCES[F32]
    assert_close(got[0], want[0], tol.value, "compiled value")
    assert_close(got[1], want[1], tol.grad, "compiled gradient")


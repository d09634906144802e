"""Shared test helpers: inputs (features, images), small losses, a float64 oracle,
value-and-gradient, tolerances, the one closeness assertion, tables of bad options.

Imported by the test modules as ``helpers`` (pytest puts ``tests/`` on ``sys.path``, as it
does for ``conftest.py``). ``conftest.py`` has already set ``TRITON_INTERPRET`` when no
GPU is present, so importing the Triton kernels after this module is safe.

The oracle (:func:`loop_kl` for values, :func:`kl_gradient` for gradients) is written from
the definition, independently of :mod:`d2sm_loss.ops`:

    xh_i = x_i / |x_i|  (0 for an all-zero row)   c_ij = xh_i . xh_j   (d_ij likewise from y)
    log s(c) = log((1 + c) / 2 + COSINE_ETA)  (cosine)   or   (c - 1) / tau  (softmax)
    px(j | i) = s(c_ij) / sum_j s(c_ij)       py from d  (j != i when include_self=False)
    KL_i = sum_j py_ij (log py_ij - log px_ij)
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from d2sm_loss.ops.reference import COSINE_ETA, NORM_EPS

#: Where the Triton kernels run: the GPU when there is one, else the CPU (interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Without a GPU the Triton kernels run through the interpreter, which is slow: small shapes.
TRITON_INTERPRETED = not torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def triton_skip_reason() -> str | None:
    """Why the Triton kernels cannot run in this process, or None when they can (on a GPU,
    or on the CPU with ``TRITON_INTERPRET`` set before they were imported)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "no GPU and TRITON_INTERPRET is not set"
    try:
        import d2sm_loss.ops.triton_kernels  # noqa: F401
    except ImportError as error:
        return f"the Triton kernels do not import: {error}"
    return None


# --- inputs ----------------------------------------------------------------------------


def features(
    groups: int,
    n: int,
    d: int,
    dtype: torch.dtype = torch.float64,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    correlated: bool = True,
    special_rows: bool = False,
) -> tuple[Tensor, Tensor]:
    """Restored features ``x`` and clean features ``y``, shape (G, N, D), drawn in float64.

    ``correlated``: ``x = y + 0.7 * noise`` (a restoration near its clean image); otherwise
    ``x`` and ``y`` are independent. ``special_rows`` (where N >= 3): an all-zero restored
    row (index 0), an all-zero clean row (index N // 2) and, on both sides, row N - 1 a copy
    of row 1. A zero row's gradient is about 1 / NORM_EPS larger than the others (compare
    with a per-row tolerance, :class:`Tolerance`) and overflows float16.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    if correlated:
        y = torch.randn(groups, n, d, generator=gen, dtype=torch.float64, device=device)
        x = y + 0.7 * torch.randn(groups, n, d, generator=gen, dtype=torch.float64, device=device)
    else:
        x = torch.randn(groups, n, d, generator=gen, dtype=torch.float64, device=device)
        y = torch.randn(groups, n, d, generator=gen, dtype=torch.float64, device=device)
    if special_rows and n >= 3:
        x[:, 0] = 0.0
        y[:, n // 2] = 0.0
        x[:, n - 1] = x[:, 1]
        y[:, n - 1] = y[:, 1]
    return x.to(dtype), y.to(dtype)


def upstream(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, *, seed: int = 1,
             device: str | torch.device = "cpu") -> Tensor:
    """A random incoming gradient of the given shape (drawn in float64 on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def value_and_grad(
    fn: Callable[..., Tensor], x: Tensor, y: Tensor, grad_out: Tensor | None = None, **kwargs
) -> tuple[Tensor, Tensor]:
    """``fn(x, y, **kwargs)`` and ``d <fn(x, y), grad_out> / dx`` on a fresh leaf copy of ``x``
    (``grad_out`` is cast to the output's dtype; None: the gradient of a scalar output). ``fn``
    is a function of features or a loss module on images alike."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, y, **kwargs)
    (grad,) = torch.autograd.grad(out, x, None if grad_out is None else grad_out.to(out.dtype))
    return out.detach(), grad


# --- the float64 oracle ----------------------------------------------------------------


def _log_s(c: float, kernel: str, temperature: float) -> float:
    return math.log((1 + c) / 2 + COSINE_ETA) if kernel == "cosine" else (c - 1) / temperature


def loop_kl(x: Tensor, y: Tensor, kernel: str, temperature: float, include_self: bool) -> Tensor:
    """Per-row KL(p_clean(.|i) || p_restored(.|i)) of one group ``x``, ``y`` (N, D), with
    Python loops over float64 numbers."""

    def unit_rows(rows: list) -> list:
        out = []
        for v in rows:
            top = max(abs(a) for a in v)  # scaled first: any finite magnitude
            v = [a / top for a in v] if top > 0 else v
            norm = max(math.sqrt(sum(a * a for a in v)), NORM_EPS)
            out.append([a / norm for a in v])
        return out

    def conditional(units: list, i: int) -> dict:
        logits = {
            j: _log_s(sum(a * b for a, b in zip(units[i], u)), kernel, temperature)
            for j, u in enumerate(units)
            if include_self or j != i
        }
        top = max(logits.values())
        z = sum(math.exp(v - top) for v in logits.values())
        return {j: math.exp(v - top) / z for j, v in logits.items()}

    ux, uy = unit_rows(x.double().tolist()), unit_rows(y.double().tolist())
    out = []
    for i in range(len(ux)):
        px, py = conditional(ux, i), conditional(uy, i)
        out.append(sum(p * (math.log(p) - math.log(px[j])) for j, p in py.items() if p > 0))
    return torch.tensor(out, dtype=torch.float64)


def kl_gradient(x: Tensor, y: Tensor, upstream: Tensor, kernel: str, temperature: float, include_self: bool) -> Tensor:
    """``d sum_i upstream_i KL_i / dx`` for one group ``x``, ``y`` (N, D), in closed form:

        G_ij = upstream_i (px_ij - py_ij) d log s / dc (c_ij)      dXh = (G + G^T) Xh
        dx_i = (dxh_i - xh_i (xh_i . dxh_i)) / |x_i|  for a nonzero row,  else  dxh_i / NORM_EPS

    Rows are divided by their largest magnitude first, so any finite magnitude works.
    """
    x, y, upstream = x.double(), y.double(), upstream.double()

    def top(t: Tensor) -> Tensor:
        m = t.abs().amax(dim=-1, keepdim=True)
        return torch.where(m > 0, m, torch.ones_like(m))

    x_top, y_top = top(x), top(y)
    norms = (x / x_top).norm(dim=-1, keepdim=True)  # |x_i| / x_top_i
    xh = x / x_top / norms.clamp_min(NORM_EPS)
    yh = y / y_top / (y / y_top).norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    c, d = xh @ xh.T, yh @ yh.T
    if kernel == "cosine":
        log_s = lambda t: torch.log((1 + t) / 2 + COSINE_ETA)  # noqa: E731
        dlog_s = 0.5 / ((1 + c) / 2 + COSINE_ETA)
    else:
        log_s = lambda t: (t - 1) / temperature  # noqa: E731
        dlog_s = torch.full_like(c, 1 / temperature)
    keep = torch.ones_like(c, dtype=torch.bool)
    if not include_self:
        keep.fill_diagonal_(False)
    px = torch.softmax(log_s(c).masked_fill(~keep, -math.inf), dim=-1)
    py = torch.softmax(log_s(d).masked_fill(~keep, -math.inf), dim=-1)
    g = upstream[:, None] * (px - py) * dlog_s * keep
    dxh = (g + g.T) @ xh
    projected = (dxh - xh * (xh * dxh).sum(-1, keepdim=True)) / norms / x_top
    return torch.where(norms > 0, projected, dxh / NORM_EPS)


# --- tolerances and the comparison -----------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol |expected| + row_rtol max_row |expected|
    + max_rtol max |expected|`` elementwise, where ``max_row`` is the largest magnitude along
    the last dimension (the row a gradient entry belongs to) and ``max`` the largest in the
    whole tensor."""

    rtol: float = 0.0
    atol: float = 0.0
    row_rtol: float = 0.0
    max_rtol: float = 0.0


def assert_close(actual: Tensor, expected: Tensor, tol: Tolerance, what: str = "") -> None:
    """Assert ``actual`` within ``tol`` of ``expected`` (compared in float64), naming the
    worst entry, its error and bound, and how many entries are out of bounds."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: {int((~torch.isfinite(a)).sum())} non-finite entries"
    bound = tol.atol + tol.rtol * e.abs()
    if tol.row_rtol:
        bound = bound + tol.row_rtol * (e.abs().amax(dim=-1, keepdim=True) if e.dim() else e.abs())
    if tol.max_rtol:
        bound = bound + tol.max_rtol * e.abs().max()
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        worst = int(torch.argmax(err - bound))
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape)) if e.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} entries out of {tol}; worst at {index}: "
            f"actual {a.flatten()[worst].item():.6e}, expected {e.flatten()[worst].item():.6e}, "
            f"error {err.flatten()[worst].item():.3e} > bound {bound.flatten()[worst].item():.3e}"
        )


@dataclass(frozen=True)
class DtypeTolerance:
    """Tolerances of the value and of the gradient for inputs of one dtype."""

    value: Tolerance
    grad: Tolerance


#: Any implementation against the float64 oracle (evaluated on the same, rounded, inputs),
#: by input dtype; each at least as tight as the per-implementation tolerances it replaced.
#: On the agreement test's inputs (CPU; reference, streaming, interpreted Triton), the
#: largest error used this share of its bound: float64 0.3 % (values and gradients),
#: float32 24 % (values) and 13 % (gradients), float16 / bfloat16 4 % (values) and 24 %
#: (gradients, i.e. about one ulp). Why each has its shape:
#: - float64: gradients of size ~1 can be off by ~1e-11 where a row has nearly antipodal
#:   neighbours (seen at D = 3: a small s(c) makes d log s / dc large), hence the absolute
#:   part; a zero row's gradient (~1 / NORM_EPS) sums terms that cancel, hence the row part.
#: - float32: relative to the largest magnitude in the row, not to the whole tensor: a zero
#:   row's gradient would otherwise hide the other rows' errors.
#: - float16 / bfloat16: the statistic is accumulated in float32 (the value is float32);
#:   gradients come back in the input dtype: 4 ulp of the largest entry of their row.
TOLERANCES = {
    torch.float64: DtypeTolerance(Tolerance(rtol=1e-12, atol=1e-12), Tolerance(rtol=1e-12, atol=5e-11, row_rtol=2e-12)),
    torch.float32: DtypeTolerance(Tolerance(atol=1e-6, row_rtol=2e-5), Tolerance(atol=1e-6, row_rtol=2e-5)),
    torch.float16: DtypeTolerance(Tolerance(rtol=1e-4, atol=1e-5), Tolerance(row_rtol=4 * 2.0**-11)),
    torch.bfloat16: DtypeTolerance(Tolerance(rtol=1e-4, atol=1e-5), Tolerance(row_rtol=4 * 2.0**-8)),
}


#: The checkout's root.
REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a test's subprocess that imports ``d2sm_loss``: the checkout's root
    goes first on ``PYTHONPATH`` (the subprocess then tests the same code as this process), except
    under ``D2SM_TEST_INSTALLED=1``, where the subprocess must import the installed wheel."""
    env = {**os.environ, **extra}
    if os.environ.get("D2SM_TEST_INSTALLED") != "1":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


# --- images and small losses ------------------------------------------------------------


def images(
    batch: int = 3,
    channels: int = 3,
    size: int = 48,
    seed: int = 0,
    *,
    noise: float = 0.1,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """A batch of clean images in [0, 1] and restored ones (clean + ``noise`` Gaussian noise,
    clamped to [0, 1]), drawn in float32 (float64 for ``dtype=torch.float64``) and cast to
    ``dtype``; the restored batch requires grad unless ``requires_grad=False``."""
    g = torch.Generator().manual_seed(seed)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    clean = torch.rand(batch, channels, size, size, generator=g, dtype=draw)
    restored = (clean + noise * torch.randn(clean.shape, generator=g, dtype=draw)).clamp(0, 1)
    return restored.to(dtype).requires_grad_(requires_grad), clean.to(dtype)


class Scale(nn.Module):
    """Multiplies its input by ``scale`` (features that overflow, when it is inf)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def conv_net(scale: float = 1.0) -> nn.Sequential:
    """A small random convolution (seed 0): 6 channels at stride 4, then tanh (times
    ``scale`` when it is not 1): features that differ a lot between images, cheap to run."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 5, stride=4), nn.Tanh())
    if scale != 1.0:
        net.append(Scale(scale))
    return net


def conv_loss(net: nn.Module | None = None, **kwargs):
    """A :class:`~d2sm_loss.SemanticStatisticsLoss` on ``net`` (default :func:`conv_net`)."""
    from d2sm_loss import SemanticStatisticsLoss

    return SemanticStatisticsLoss(conv_net() if net is None else net, **kwargs)


def timm_loss(backbone: str = "resnet10t", **kwargs):
    """A loss on a randomly initialised timm model; the same seed gives the same weights."""
    from d2sm_loss import SemanticStatisticsLoss

    kwargs.setdefault("pretrained", False)
    torch.manual_seed(0)
    return SemanticStatisticsLoss(backbone, **kwargs)


# --- bad options -------------------------------------------------------------------------

#: Options that :func:`~d2sm_loss.similarity_kl` and :class:`~d2sm_loss.SemanticStatisticsLoss`
#: both take, with a bad value, the error and the message it must match.
BAD_SHARED_OPTIONS = [
    ({"similarity": "gauss"}, ValueError, "similarity must be one of"),
    ({"similarity": 3}, ValueError, "similarity must be one of"),
    ({"temperature": 0.0}, ValueError, "temperature must be positive"),
    ({"temperature": -0.1}, ValueError, "temperature must be positive"),
    ({"temperature": float("inf")}, ValueError, "temperature must be a finite number"),
    ({"temperature": float("nan")}, ValueError, "temperature must be a finite number"),
    ({"temperature": True}, TypeError, "temperature must be a number"),
    ({"temperature": "0.1"}, TypeError, "temperature must be a number"),
    ({"include_self": 1}, TypeError, "include_self must be a bool"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"implementation": "cuda"}, ValueError, "implementation must be one of"),
]


def option_id(case: tuple) -> str:
    """A test id for a row of a bad-option table: the option's name and its value."""
    ((name, value),) = list(case[0].items())[:1]
    return f"{name}={value!r}"[:40]


def second_order(statistic: Callable[..., Tensor], x: Tensor, y: Tensor, upstream_: Tensor, direction: Tensor, **options):
    """First derivative ``g = d<statistic(x), w>/dx`` with a graph, and the derivatives of
    ``<g, direction>`` with respect to ``x`` (a Hessian-vector product) and to ``w``."""
    x = x.detach().clone().requires_grad_(True)
    w = upstream_.detach().clone().requires_grad_(True)
    rows = statistic(x, y, **options)
    (g,) = torch.autograd.grad(rows, x, w, create_graph=True)
    assert g.requires_grad, "the first derivative carries no graph"
    hvp, dw = torch.autograd.grad((g * direction).sum(), (x, w))
    return g.detach(), hvp, dw

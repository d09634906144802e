"""What the D2SM loss costs in a training step (issue 5).

Times full training steps (forward, ``backward``, ``optimizer.step``) of a DnCNN-style
denoiser (17 conv layers x 64 channels by default, Adam) with these losses, side by side
in one run:

====  ==============  ====================================================================
key   config          loss
====  ==============  ====================================================================
(a)   ``l1``          L1 only
(b)   ``vgg``         L1 + a VGG perceptual loss: L1 between VGG19 conv5_4 features before
                      the ReLU (``features.34``, the paper preset's layer), BasicSR-style
                      (ImageNet mean/std input normalisation, clean features without grad)
(c)   ``paper``       L1 + ``SemanticStatisticsLoss.paper(pretrained=False)`` (image
                      granularity, conv5_4, queue of 224 rows, kept full: steady state;
                      ``implementation="auto"``, which picks the streaming path for its
                      rows of D = 512 * (S/16)^2 features)
(d)   ``loc-torch``   L1 + the loss at location granularity (VGG19 relu3_4,
                      ``features.17``, stride 4: N = H/4 * W/4 rows of D = 256 per image)
                      with ``implementation="torch"`` (streaming)
(e)   ``loc-triton``  the same with ``implementation="triton"`` (CUDA only; on the CPU a
                      row with status ``skipped`` and the reason is recorded)
(f)   ``contextual``  L1 + a contextual loss (Mechrez et al., ECCV 2018) on the same
                      location features: the dense N x N peer, written below
====  ==============  ====================================================================

All VGG weights are random (``pretrained=False``); weights do not change the timing. The
loss terms are weighted 0.1 (irrelevant for timing).

Figures per configuration and image size:

- ``part=step``: median step time with IQR, min and max; peak memory of the step; the
  ratios of time (of the medians; and ``paired_ratio_*``, the median over rounds of the
  ratio of two configurations' back-to-back steps, robust to drifts of the machine's
  speed) and of memory to (a) and to (b).
- the loss alone (its forward + backward into a restored image that requires grad),
  split into ``part=backbone`` (restored image through the frozen backbone with grad,
  forward + backward of an upstream gradient, plus the clean image without grad) and
  ``part=statistics`` (the statistic alone on precomputed features, forward + backward:
  ``similarity_kl`` for D2SM, including the queue rows for the paper preset; the L1 of the
  feature maps for (b); the contextual loss for (f)) and ``part=loss`` (the whole loss);
  ``share_pct`` of a part is its median time in % of the loss's. For the location layer a
  ``dense-kl`` statistics row adds the same KL computed with full N x N matrices and plain
  autograd (the authors' formulation).

Timing. Inputs are random (``torch.rand`` clean images, noise ``0.1 * randn``; features
``randn``), fresh for every timed call, built outside the timed region. Each
configuration first runs ``--warmup`` untimed steps (cuDNN autotuning, Triton
compilation and autotuning, the loss's queue allocation); then the repeats are
interleaved: repeat ``r`` runs every configuration once, in an order rotated by ``r``,
so that drifts (clock, thermal, other processes) spread over all of them. CUDA: CUDA
events around each call after ``torch.cuda.synchronize()``, ``cudnn.benchmark`` on;
CPU: ``time.perf_counter`` around each call, ``gc.collect()`` before it.

Memory. CUDA: ``torch.cuda.max_memory_allocated`` during one call, after
``reset_peak_memory_stats``, minus the memory allocated before it (weights, optimizer
state, the backbone and the loss's queue are resident before and not counted; the
step's activations, gradients and workspaces are). CPU: the same call in this process
with ``_common.RssPeak``: free heap returned to the OS (``malloc_trim``), the kernel's
resident-set high-water mark reset (``/proc/self/clear_refs``), figure = VmHWM after the
call minus VmRSS before (PyTorch's CPU allocator caches nothing, so the step's
allocations all show up as new resident pages).

Targets (issue 5; defined on the GPU): the statistics take <= 5% of the loss's time at
image granularity (the paper preset); the paper configuration's step takes <= 1.1x the
step of the perceptual baseline (b); at N = 4096 the Triton statistics are >= 4x faster
and use >= 20x less memory than the contextual loss (f)'s statistic (a ``dense-kl``
comparison is printed too). The default invocation on a CUDA machine (batch 8 at
256x256, where relu3_4 gives N = 4096, and batch 16 at 128x128) measures all of them; a
summary line per target gives the figure and PASS/FAIL (marked "indicative" on a CPU).

Column ``implementation``: the ``similarity_kl`` path a D2SM row ran (``triton``, ``torch``
or ``reference``): ``criterion.last_implementation`` after the step or the whole loss, and
for the ``statistics`` part what the criterion's setting resolves to for those rows. (d)
must read ``torch`` and (e) ``triton``; anything else turns the case into an error row.

Errors. Running out of memory marks a case ``OOM``; any other error marks it
``error: <Type>: <first line>`` (traceback on stderr); either way the case leaves the
rotation and the run goes on.

Every run appends its rows to ``<out>/loss_overhead.csv`` (device, torch/triton/timm
versions, commit, date, configuration, figures; after each image size, so a run cut
short keeps the sizes it finished) and redraws one PNG per (device, batch, image size)
from the newest rows of the CSV. ``--commit`` (or ``$D2SM_COMMIT``) sets the commit
column for a copy of the repository without ``.git``.

Usage::

    python benchmarks/loss_overhead.py                 # CUDA: 8x256^2 and 16x128^2; CPU: 4x96^2
    python benchmarks/loss_overhead.py --quick         # CPU smoke run (< 1 minute)
    python benchmarks/loss_overhead.py --sizes 4x96 --repeats 7 --configs l1 vgg paper
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import math
import statistics
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks import _common as common  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import common as examples_common  # noqa: E402
from d2sm_loss import SemanticStatisticsLoss  # noqa: E402
from d2sm_loss._compat import import_timm  # noqa: E402
from d2sm_loss.functional import resolve_implementation, similarity_kl  # noqa: E402

CSV_NAME = "loss_overhead.csv"
CONFIGS = {
    "l1": "(a) L1",
    "vgg": "(b) L1 + VGG perceptual conv5_4",
    "paper": "(c) L1 + D2SM paper (image, conv5_4, queue 224)",
    "loc-torch": "(d) L1 + D2SM location, torch",
    "loc-triton": "(e) L1 + D2SM location, triton",
    "contextual": "(f) L1 + contextual loss, location",
}
SHORT = {"l1": "a", "vgg": "b", "paper": "c", "loc-torch": "d", "loc-triton": "e", "contextual": "f",
         "dense-kl": "dense"}
FIELDS = [
    "date", "commit", "device", "torch", "triton", "timm", "python", "threads", "run_id",
    "config", "label", "part", "batch", "height", "width", "G", "N", "D", "implementation",
    "net", "location_layer", "dtype", "repeats", "warmup", "status",
    "time_median_ms", "time_iqr_ms", "time_min_ms", "time_max_ms", "peak_mem_mb", "mem_method",
    "ratio_time_vs_a", "ratio_time_vs_b", "paired_ratio_vs_a", "paired_ratio_vs_b",
    "ratio_mem_vs_a", "ratio_mem_vs_b", "share_pct", "note",
]
AUX_WEIGHT = 0.1
#: Configurations whose loss is built with a fixed implementation (recorded per row in ``implementation``).
FORCED_IMPLEMENTATION = {"loc-torch": "torch", "loc-triton": "triton"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- the restoration network ------------------------------------------------------------


# The examples' DnCNN (examples/common.py): the network a user of this package trains.
DnCNN = examples_common.DnCNN


# --- the auxiliary losses ---------------------------------------------------------------


def vgg19_features(last: int, device: torch.device) -> nn.Sequential:
    """timm's VGG19 ``features`` up to and including module ``last``, random weights
    (built on the meta device, so the 100M-parameter classifier is never allocated)."""
    timm = import_timm()
    with torch.device("meta"):
        full = timm.create_model("vgg19", pretrained=False)
    features = full.features[: last + 1]
    features = features.to_empty(device=device)
    with torch.no_grad():
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
    return features.requires_grad_(False).eval()


class Aux:
    """A loss term and its split: ``backbone`` (feature maps of the restored images with
    grad and of the clean ones without), ``rows`` (the statistic's inputs from the maps)
    and ``statistic`` (rows -> scalar). ``__call__`` is the loss as a user calls it."""

    location = False

    def __call__(self, restored: Tensor, clean: Tensor) -> Tensor:
        raise NotImplementedError

    def backbone(self, restored: Tensor, clean: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        raise NotImplementedError

    def rows(self, x_maps: list[Tensor], y_maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        return x_maps[0], y_maps[0]

    def statistic(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Called when the image size changes."""

    def used_implementation(self, part: str) -> str:
        """The similarity_kl implementation that ``part`` ran ("" when it runs none)."""
        return ""


class Perceptual(Aux):
    """BasicSR-style perceptual loss: L1 between VGG19 ``features.34`` (conv5_4, before
    its ReLU) of the restored and the clean images, ImageNet-normalised inputs."""

    def __init__(self, device: torch.device, last: int = 34) -> None:
        self.features = vgg19_features(last, device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def _extract(self, images: Tensor) -> Tensor:
        return self.features((images - self.mean) / self.std)

    def backbone(self, restored, clean):
        x = self._extract(restored)
        with torch.no_grad():
            y = self._extract(clean)
        return [x], [y]

    def statistic(self, x, y):
        return F.l1_loss(x, y)

    def __call__(self, restored, clean):
        x, y = self.backbone(restored, clean)
        return self.statistic(x[0], y[0])


class D2SM(Aux):
    """A :class:`SemanticStatisticsLoss`; the split goes through its ``_extractor``
    (the frozen backbone, [0, 1] images in) and :func:`similarity_kl`."""

    def __init__(self, criterion: SemanticStatisticsLoss) -> None:
        self.criterion = criterion
        self.location = criterion.granularity == "location"

    def __call__(self, restored, clean):
        return self.criterion(restored, clean)

    def backbone(self, restored, clean):
        x = self.criterion._extractor(restored)
        with torch.no_grad():
            y = self.criterion._extractor(clean)
        return x, y

    def rows(self, x_maps, y_maps):
        x, y = x_maps[0], y_maps[0]
        if self.location:  # (B, C, h, w) -> (B, h*w, C): one group per image
            return x.flatten(2).transpose(1, 2), y.flatten(2).transpose(1, 2)
        x, y = x.flatten(1), y.flatten(1)
        if self.criterion.queues is not None:  # the batch's rows and the queue's, as forward() does
            past_x, past_y = self.criterion.queues[0].rows()
            x, y = torch.cat([x, past_x]), torch.cat([y, past_y])
        return x, y

    def statistic(self, x, y):
        c = self.criterion
        self.statistic_implementation = resolve_implementation(c.implementation, x.device, x.shape[-1])
        return similarity_kl(x, y, kernel=c.kernel, temperature=c.temperature, include_self=c.include_self,
                             reduction=c.reduction, implementation=c.implementation)

    def used_implementation(self, part: str) -> str:
        """``criterion.last_implementation`` for the step and the whole loss; for the
        ``statistics`` part (which calls :func:`similarity_kl` directly) the implementation
        the criterion's setting resolves to for those rows."""
        if part == "statistics":
            return getattr(self, "statistic_implementation", "")
        if part == "backbone":
            return ""
        return self.criterion.last_implementation or ""

    def fill_queue(self, batch: int, height: int, width: int, device: torch.device) -> None:
        """Allocate the queue with one call and fill it with random rows: the steady
        state of training (the queue is full after 224 / batch steps).

        The call runs in training mode with gradients enabled (the loss updates its queue
        only then; the inputs need not require grad, so no graph is kept), and the queue
        must be full afterwards."""
        if self.criterion.queues is None:
            return
        self.criterion.reset_queue()
        with torch.enable_grad():
            self.criterion(torch.rand(batch, 3, height, width, device=device),
                           torch.rand(batch, 3, height, width, device=device))
        queue = self.criterion.queues[0]
        if queue.count == 0:
            raise RuntimeError("fill_queue: the loss's call did not push its rows into the memory queue "
                               f"(training={self.criterion.training}, grad enabled={torch.is_grad_enabled()})")
        with torch.no_grad():
            while queue.count < queue.size:
                rows = torch.randn(queue.size, queue.feature_size, device=device)
                queue.push(rows, torch.randn_like(rows))
        for index, q in enumerate(self.criterion.queues):
            if q.count != q.size:
                raise RuntimeError(f"fill_queue: queue {index} holds {q.count} of {q.size} rows")

    def reset(self):
        self.criterion.reset_queue()


def contextual_loss(x: Tensor, y: Tensor, bandwidth: float = 0.5, eps: float = 1e-5) -> Tensor:
    """The contextual loss (Mechrez, Talmi, Zelnik-Manor, ECCV 2018) between feature sets
    ``x`` (restored, (G, N, D)) and ``y`` (clean), the usual dense formulation:
    cosine distances to the clean features' mean-centred vectors, relative distances
    ``d / (min_j d + eps)``, ``w = exp((1 - d~) / h)``, row-normalised, the max over the
    restored features for each clean one, ``-log`` of their mean. N x N matrices, plain
    autograd."""
    mu = y.mean(dim=1, keepdim=True)
    xn = F.normalize(x - mu, dim=-1)
    yn = F.normalize(y - mu, dim=-1)
    dist = 1.0 - xn @ yn.transpose(1, 2)  # (G, N_x, N_y)
    relative = dist / (dist.min(dim=-1, keepdim=True).values + eps)
    w = torch.exp((1.0 - relative) / bandwidth)
    cx = w / w.sum(dim=-1, keepdim=True)
    return -torch.log(cx.max(dim=1).values.mean(dim=-1) + eps).mean()


def dense_similarity_kl(x: Tensor, y: Tensor) -> Tensor:
    """The D2SM statistic (cosine kernel, diagonal included) the straightforward way:
    full N x N matrices, plain autograd (how the authors' code computes it)."""
    xn = F.normalize(x, dim=-1)
    with torch.no_grad():
        yn = F.normalize(y, dim=-1)
        py = (1.0 + yn @ yn.transpose(-1, -2)) / 2.0
        py = py / py.sum(dim=-1, keepdim=True)
    kx = (1.0 + xn @ xn.transpose(-1, -2)) / 2.0
    px = kx / kx.sum(dim=-1, keepdim=True)
    return (py * torch.log((py + 1e-6) / (px + 1e-6))).sum(dim=-1).mean()


class Contextual(D2SM):
    """The contextual loss on the location features of a location-granularity D2SM loss's
    backbone (shared, so both see the same layer)."""

    def used_implementation(self, part: str) -> str:
        return ""

    def __call__(self, restored, clean):
        x, y = self.backbone(restored, clean)
        return self.statistic(*self.rows(x, y))

    def statistic(self, x, y):
        return contextual_loss(x, y)


class DenseKL(D2SM):
    def used_implementation(self, part: str) -> str:
        return ""

    def statistic(self, x, y):
        return dense_similarity_kl(x, y)


# --- cases: (prepare, run) pairs ---------------------------------------------------------


@dataclass
class Case:
    config: str
    part: str
    prepare: Callable[[], Any]
    run: Callable[[Any], Any]
    shape: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    peak_bytes: float = math.nan
    mem_method: str = ""
    status: str = "ok"
    implementation_of: Callable[[], str] | None = None  # which similarity_kl path the case ran
    implementation: str = ""


def make_step_case(config: str, aux: Aux | None, net: nn.Module, batch: int, height: int, width: int,
                   device: torch.device) -> Case:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def prepare():
        clean = torch.rand(batch, 3, height, width, device=device)
        return clean + 0.1 * torch.randn_like(clean), clean

    def run(state):
        noisy, clean = state
        optimizer.zero_grad(set_to_none=True)
        restored = net(noisy)
        loss = F.l1_loss(restored, clean)
        if aux is not None:
            loss = loss + AUX_WEIGHT * aux(restored, clean)
        loss.backward()
        optimizer.step()

    implementation_of = functools.partial(aux.used_implementation, "step") if aux is not None else None
    return Case(config, "step", prepare, run, implementation_of=implementation_of)


def make_loss_cases(config: str, aux: Aux, batch: int, height: int, width: int, device: torch.device,
                    with_loss: bool = True) -> list[Case]:
    """``loss`` (whole loss, forward + backward), ``backbone`` and ``statistics``."""
    def images():
        restored = torch.rand(batch, 3, height, width, device=device, requires_grad=True)
        return restored, torch.rand(batch, 3, height, width, device=device)

    with torch.no_grad():
        x_maps, y_maps = aux.backbone(*images())
        x_rows, _ = aux.rows(x_maps, y_maps)
    map_shapes = [m.shape for m in x_maps]
    row_shape = x_rows.shape
    del x_maps, y_maps, x_rows
    if isinstance(aux, Perceptual):  # the "rows" are the feature maps themselves
        g, n, d = row_shape[0], 1, int(math.prod(row_shape[1:]))
    else:
        g, n, d = (1, *row_shape) if len(row_shape) == 2 else tuple(row_shape)
    shape = {"G": g, "N": n, "D": d}

    def run_loss(state):
        aux(*state).backward()

    def prepare_backbone():
        restored, clean = images()
        return restored, clean, [torch.randn(s, device=device) for s in map_shapes]

    def run_backbone(state):
        restored, clean, grads = state
        x_maps, _ = aux.backbone(restored, clean)
        torch.autograd.backward(x_maps, grads)

    def prepare_statistics():
        x = torch.randn(row_shape, device=device, requires_grad=True)
        return x, torch.randn(row_shape, device=device)

    def run_statistics(state):
        aux.statistic(*state).backward()

    def used(part):
        return functools.partial(aux.used_implementation, part)

    cases = [Case(config, "statistics", prepare_statistics, run_statistics, dict(shape),
                  implementation_of=used("statistics"))]
    if with_loss:
        cases = [Case(config, "loss", images, run_loss, dict(shape), implementation_of=used("loss")),
                 Case(config, "backbone", prepare_backbone, run_backbone, dict(shape))] + cases
    return cases


# --- measuring ----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_memory(case: Case, device: torch.device) -> None:
    state = case.prepare()
    if device.type == "cuda":
        case.peak_bytes = common.cuda_peak_bytes(functools.partial(case.run, state))
        case.mem_method = "cuda-max-allocated above pre-call"
    else:
        gc.collect()
        with common.RssPeak() as peak:
            case.run(state)
        case.peak_bytes = peak.peak_bytes
        case.mem_method = peak.method + " in-process (malloc_trim first)"
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_interleaved(cases: list[Case], repeats: int, warmup: int, device: torch.device) -> None:
    """Warm every case up, then ``repeats`` rounds, each running every case once in an
    order rotated by the round number; fresh inputs per call, outside the timed region.
    A case that runs out of memory is marked ``OOM`` and leaves the rotation."""
    live = [c for c in cases if c.status == "ok"]
    for case in live:
        for _ in range(warmup):
            guarded(case, lambda: case.run(case.prepare()))
    for r in range(repeats):
        live = [c for c in live if c.status == "ok"]
        shift = r % max(1, len(live))
        for case in live[shift:] + live[:shift]:
            guarded(case, lambda: case.times.append(timed_call(case, device)))


def timed_call(case: Case, device: torch.device) -> float:
    """Seconds of one ``case.run`` on fresh inputs."""
    state = case.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        case.run(state)
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3
    gc.collect()
    t0 = time.perf_counter()
    case.run(state)
    return time.perf_counter() - t0


def guarded(case: Case, fn: Callable[[], None]) -> None:
    """Run ``fn``; an error marks this case (status ``OOM``, or ``error: <Type>: <first
    line>`` with the traceback on stderr), which leaves the rotation; the run goes on."""
    try:
        fn()
        if case.implementation_of is not None:
            case.implementation = case.implementation_of()
    except Exception as error:
        if common.is_oom(error):
            case.status = "OOM"
        else:
            print(f"error in ({SHORT.get(case.config, '?')}) {case.config} {case.part}:", file=sys.stderr)
            traceback.print_exc()
            case.status = common.error_status(error)
        case.times.clear()
        if torch.cuda.is_available():
            try:
                torch.cuda.empty_cache()
            except Exception:  # a broken CUDA context: later cases report their own errors
                pass


# --- one image size -------------------------------------------------------------------------


def triton_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "skipped: no CUDA device (the Triton kernels need a GPU)"
    from d2sm_loss.functional import _triton_error

    reason = _triton_error()
    return f"skipped: {reason}" if reason else None


def build_auxes(configs: list[str], args, device: torch.device) -> tuple[dict[str, Aux], dict[str, str]]:
    """The loss objects (built once, reused for every image size) and skip notes."""
    auxes: dict[str, Aux] = {}
    skipped: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights; DnCNN outputs slightly outside [0, 1]
        if "vgg" in configs:
            auxes["vgg"] = Perceptual(device)
        if "paper" in configs:
            auxes["paper"] = D2SM(SemanticStatisticsLoss.paper(pretrained=False).to(device))
        if any(c in configs for c in ("loc-torch", "loc-triton", "contextual")):
            location = SemanticStatisticsLoss("vgg19", layers=[args.location_layer], granularity="location",
                                              pretrained=False, implementation="torch").to(device)
            auxes["loc-torch"] = D2SM(location)
            if "loc-triton" in configs:
                reason = triton_skip_reason(device)
                if reason:
                    skipped["loc-triton"] = reason
                else:  # same frozen backbone, other implementation
                    triton_loss = copy.copy(location)
                    triton_loss.implementation = "triton"
                    auxes["loc-triton"] = D2SM(triton_loss)
            auxes["contextual"] = Contextual(location)
            auxes["dense-kl"] = DenseKL(location)
    return auxes, skipped


def run_size(batch: int, height: int, width: int, configs: list[str], auxes: dict[str, Aux],
             skipped: dict[str, str], args, device: torch.device) -> list[Case]:
    torch.manual_seed(0)
    template = DnCNN(args.depth, args.width).to(device)
    for aux in auxes.values():
        aux.reset()
    if "paper" in auxes:
        auxes["paper"].fill_queue(batch, height, width, device)

    step_cases = []
    for config in configs:
        if config in skipped:
            case = Case(config, "step", lambda: None, lambda s: None, status=skipped[config])
        else:
            case = make_step_case(config, auxes.get(config), copy.deepcopy(template), batch, height, width, device)
        step_cases.append(case)
    loss_cases = []
    for config in configs:
        if config == "l1":
            continue
        if config in skipped:
            loss_cases += [Case(config, part, lambda: None, lambda s: None, status=skipped[config])
                           for part in ("loss", "backbone", "statistics")]
            continue
        loss_cases += make_loss_cases(config, auxes[config], batch, height, width, device)
    if "dense-kl" in auxes and any(c in configs for c in ("loc-torch", "loc-triton", "contextual")):
        loss_cases += make_loss_cases("dense-kl", auxes["dense-kl"], batch, height, width, device, with_loss=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group in (step_cases, loss_cases):
            # One untimed call per case before its memory figure (cuDNN/Triton autotuning,
            # lazy initialisation), the rest of the warm-up in time_interleaved.
            for case in group:
                if case.status == "ok":
                    guarded(case, lambda: case.run(case.prepare()))
            for case in group:
                if case.status == "ok":
                    guarded(case, lambda: measure_memory(case, device))
            time_interleaved(group, args.repeats, max(0, args.warmup - 1), device)
    if "paper" in auxes:
        auxes["paper"].reset()
    for case in step_cases + loss_cases:
        forced = FORCED_IMPLEMENTATION.get(case.config)
        if forced and case.status == "ok" and case.implementation and case.implementation != forced:
            print(f"warning: ({SHORT[case.config]}) {case.config} {case.part} ran {case.implementation!r}, "
                  f"not {forced!r}", file=sys.stderr)
            case.status = f"error: ran {case.implementation}, not {forced}"
            case.times.clear()
    return step_cases + loss_cases


def rows_for_size(cases: list[Case], batch: int, height: int, width: int, base: dict[str, Any], args) -> list[dict]:
    rows = []
    step = {c.config: c for c in cases if c.part == "step"}
    loss_time = {c.config: statistics.median(c.times) for c in cases if c.part == "loss" and c.times}

    def ratio(value: float, ref: Case | None, attr: str) -> float | str:
        if ref is None or not ref.times:
            return ""
        ref_value = statistics.median(ref.times) if attr == "time" else ref.peak_bytes
        return value / ref_value if ref_value and math.isfinite(ref_value) and ref_value > 0 else ""

    shapes = {c.config: c.shape for c in cases if c.part == "statistics"}

    def paired(case: Case, ref: Case | None) -> float | str:
        """Median over rounds of this case's time / the reference's in the same round
        (they ran back to back), robust to slow drifts of the machine's speed."""
        if ref is None or not ref.times or len(ref.times) != len(case.times):
            return ""
        return statistics.median(t / u for t, u in zip(case.times, ref.times))

    for case in cases:
        if case.part == "step":
            case.shape = dict(shapes.get(case.config, {}))
        label = CONFIGS.get(case.config, "D2SM statistic, dense N x N (no step)")
        skip = case.status.startswith("skipped")
        row = {**base, "config": case.config, "label": label,
               "part": case.part, "batch": batch, "height": height, "width": width,
               "status": "skipped" if skip else case.status, "implementation": case.implementation,
               "note": " ".join(filter(None, [case.status.removeprefix("skipped: ") if skip else "", args.note])),
               **case.shape}
        if case.times:
            row.update(common.summarize(case.times))
            row["peak_mem_mb"] = case.peak_bytes / 2**20
            row["mem_method"] = case.mem_method
            median = statistics.median(case.times)
            if case.part == "step":
                row["ratio_time_vs_a"] = ratio(median, step.get("l1"), "time")
                row["ratio_time_vs_b"] = ratio(median, step.get("vgg"), "time")
                row["paired_ratio_vs_a"] = paired(case, step.get("l1"))
                row["paired_ratio_vs_b"] = paired(case, step.get("vgg"))
                row["ratio_mem_vs_a"] = ratio(case.peak_bytes, step.get("l1"), "mem")
                row["ratio_mem_vs_b"] = ratio(case.peak_bytes, step.get("vgg"), "mem")
            elif case.config in loss_time:
                row["share_pct"] = 100.0 * median / loss_time[case.config]
        rows.append(row)
    return rows


def print_size(rows: list[dict], batch: int, height: int, width: int) -> None:
    print(f"\n== batch {batch} at {height}x{width} ==")
    print(f"{'config':<46} {'part':<10} {'median ms':>10} {'IQR ms':>8} {'peak MiB':>9} {'x(a)':>6} {'x(b)':>6} "
          f"{'pair x(b)':>9} {'mem x(a)':>8} {'mem x(b)':>8} {'share%':>7} impl")

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) and value != "" else "-"

    for row in rows:
        if row["status"] != "ok":
            print(f"{row['label']:<46} {row['part']:<10} {row['status']}: {row.get('note', '')}")
            continue
        print(f"{row['label']:<46} {row['part']:<10} {row['time_median_ms']:>10.2f} {row['time_iqr_ms']:>8.2f} "
              f"{row['peak_mem_mb']:>9.1f} {fmt(row.get('ratio_time_vs_a', ''), '6.2f'):>6} "
              f"{fmt(row.get('ratio_time_vs_b', ''), '6.2f'):>6} {fmt(row.get('paired_ratio_vs_b', ''), '9.3f'):>9} "
              f"{fmt(row.get('ratio_mem_vs_a', ''), '8.2f'):>8} {fmt(row.get('ratio_mem_vs_b', ''), '8.2f'):>8} "
              f"{fmt(row.get('share_pct', ''), '7.1f'):>7} {row.get('implementation') or '-'}")


# --- targets -----------------------------------------------------------------------------------


def evaluate_targets(rows: list[dict], on_cuda: bool) -> list[str]:
    """One line per issue-5 target and measured size: figure and PASS/FAIL."""
    tag = "" if on_cuda else " [CPU: indicative only, the target is defined on the GPU]"
    lines = []

    def find(config, part, batch, height):
        for row in rows:
            if (row["config"], row["part"], row["batch"], row["height"]) == (config, part, batch, height) \
                    and row["status"] == "ok":
                return row
        return None

    sizes = sorted({(r["batch"], r["height"], r["width"]) for r in rows}, key=lambda s: -s[1])
    for batch, height, width in sizes:
        where = f"batch {batch} at {height}x{width}"
        stats = find("paper", "statistics", batch, height)
        share = stats.get("share_pct") if stats is not None else None
        if isinstance(share, (int, float)) and math.isfinite(share):
            lines.append(f"target 1 (statistics <= 5% of the loss's time, image granularity), {where}: "
                         f"{share:.2f}% -> {'PASS' if share <= 5 else 'FAIL'}{tag}")
        elif stats is not None:
            loss = next((r for r in rows if (r["config"], r["part"], r["batch"], r["height"])
                         == ("paper", "loss", batch, height)), None)
            why = f"the whole loss: {loss['status']}" if loss is not None else "the whole loss was not measured"
            lines.append(f"target 1, {where}: not measured (no share: {why})")
        else:
            lines.append(f"target 1, {where}: not measured (paper config not run or its statistics failed)")
        paper, vgg = find("paper", "step", batch, height), find("vgg", "step", batch, height)
        if paper is not None and vgg is not None:
            ratio = paper["time_median_ms"] / vgg["time_median_ms"]
            pair = paper.get("paired_ratio_vs_b")
            pair_txt = f" (median of per-round ratios {pair:.3f}x)" if isinstance(pair, float) else ""
            lines.append(f"target 2 (paper step <= 1.1x perceptual step (b)), {where}: {ratio:.3f}x{pair_txt} "
                         f"-> {'PASS' if ratio <= 1.1 else 'FAIL'}{tag}")
        else:
            lines.append(f"target 2, {where}: not measured (needs configs paper and vgg)")
    n_rows = [r for r in rows if r["config"] in ("loc-triton", "contextual", "loc-torch", "dense-kl")
              and r["part"] == "statistics" and r["status"] == "ok"]
    at_4096 = [r for r in n_rows if int(r["N"]) == 4096]
    triton = [r for r in at_4096 if r["config"] == "loc-triton"]
    if triton:
        tri = triton[0]
        for peer_name in ("contextual", "dense-kl"):
            peer = next((r for r in at_4096 if r["config"] == peer_name and r["batch"] == tri["batch"]), None)
            if peer is None:
                continue
            speed = peer["time_median_ms"] / tri["time_median_ms"]
            memory = peer["peak_mem_mb"] / tri["peak_mem_mb"] if tri["peak_mem_mb"] > 0 else math.inf
            verdict = "PASS" if speed >= 4 and memory >= 20 else "FAIL"
            primary = "" if peer_name == "contextual" else " (informative: same KL, dense)"
            lines.append(f"target 3 (triton >= 4x faster, >= 20x less memory than {peer_name} at N=4096, "
                         f"G={tri['G']}, D={tri['D']}, forward+backward){primary}: {speed:.2f}x faster, "
                         f"{memory:.1f}x less memory -> {verdict}{tag}")
    else:
        ran_triton = any(r["config"] == "loc-triton" and r["status"] == "ok" for r in rows)
        why = "no CUDA/Triton in this run" if not ran_triton \
            else "no image size gives N=4096 at the location layer (use 256x256 with features.17)"
        lines.append(f"target 3 (triton vs contextual at N=4096): not measured ({why})")
        torch_rows = [r for r in n_rows if r["config"] == "loc-torch"]
        for row in torch_rows:
            peer = next((r for r in n_rows if r["config"] == "contextual" and r["batch"] == row["batch"]
                         and r["height"] == row["height"]), None)
            if peer is not None:
                memory = peer["peak_mem_mb"] / row["peak_mem_mb"] if row["peak_mem_mb"] > 0 else math.inf
                lines.append(f"  for information: at N={row['N']}, G={row['G']}, D={row['D']} the contextual "
                             f"statistic takes {peer['time_median_ms'] / row['time_median_ms']:.2f}x the time and "
                             f"{memory:.1f}x the memory of the torch streaming one")
    return lines


# --- plots ---------------------------------------------------------------------------------------


def draw_plots(csv_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per (device, batch, image size, network): step time, step memory and the
    ratios per configuration, and the loss's split into backbone, statistics and the rest;
    from the newest run that measured that group."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plots drawn (pip install matplotlib)")
        return []
    rows = common.read_rows(csv_path)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["device"], row["batch"], row["height"], row["width"], row["net"]), []).append(row)
    written = []
    for (device, batch, height, width, net), group in sorted(groups.items()):
        run_id = group[-1]["run_id"]  # the newest run of this group
        group = [r for r in group if r["run_id"] == run_id]
        step = [r for r in group if r["part"] == "step" and r["status"] == "ok"]
        if not step:
            continue
        fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
        labels = [r["label"].replace(" + ", "+\n", 1) for r in step]
        xs = range(len(step))
        med = [common.as_float(r["time_median_ms"]) for r in step]
        low = [m - common.as_float(r["time_min_ms"]) for m, r in zip(med, step)]
        high = [common.as_float(r["time_max_ms"]) - m for m, r in zip(med, step)]
        colors = [f"C{i}" for i in xs]
        ax = axes[0][0]
        ax.bar(xs, med, yerr=[low, high], capsize=4, color=colors)
        ax.set_ylabel("step time, median (ms); bars: min..max")
        ax.set_title("training step (forward, backward, Adam step)", fontsize=10)
        ax = axes[0][1]
        mem = [common.as_float(r["peak_mem_mb"]) for r in step]
        ax.bar(xs, mem, color=colors)
        ax.set_ylabel("peak memory of the step (MiB)")
        ax.set_title(f"memory ({step[0]['mem_method']})", fontsize=9)
        ax = axes[1][0]
        width_bar = 0.2
        series = [("ratio_time_vs_a", "time / (a)"), ("ratio_time_vs_b", "time / (b)"),
                  ("ratio_mem_vs_a", "memory / (a)"), ("ratio_mem_vs_b", "memory / (b)")]
        for k, (column, name) in enumerate(series):
            values = [common.as_float(r.get(column)) for r in step]
            ax.bar([x + (k - 1.5) * width_bar for x in xs], values, width_bar, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.1, color="gray", linestyle="--", linewidth=0.8, label="1.1 (target c/b)")
        ax.set_ylabel("ratio")
        ax.set_title("ratios to (a) L1 and (b) perceptual", fontsize=10)
        ax.legend(fontsize=7)
        for a in (axes[0][0], axes[0][1], axes[1][0]):
            a.set_xticks(list(xs))
            a.set_xticklabels(labels, fontsize=7, rotation=25, ha="right")
            a.grid(True, axis="y", alpha=0.3)
        ax = axes[1][1]
        parts = {(r["config"], r["part"]): r for r in group if r["part"] in ("loss", "backbone", "statistics")
                 and r["status"] == "ok"}
        loss_configs = [c for c in list(CONFIGS) + ["dense-kl"] if (c, "loss") in parts or (c, "statistics") in parts]
        for i, config in enumerate(loss_configs):
            def median_of(part: str, default: float) -> float:
                row = parts.get((config, part))
                return common.as_float(row["time_median_ms"]) if row else default

            total = median_of("loss", math.nan)
            backbone, stats = median_of("backbone", 0.0), median_of("statistics", 0.0)
            other = max(0.0, total - backbone - stats) if math.isfinite(total) else 0.0
            ax.bar(i, backbone, color="C0", label="backbone passes" if i == 0 else None)
            ax.bar(i, stats, bottom=backbone, color="C3", label="statistics" if i == 0 else None)
            ax.bar(i, other, bottom=backbone + stats, color="C7", label="rest of the loss" if i == 0 else None)
            share = f"{100 * stats / total:.1f}%" if math.isfinite(total) and total > 0 else f"{stats:.1f} ms"
            ax.annotate(f"stats\n{share}", (i, backbone + stats + other), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(loss_configs)))
        ax.set_xticklabels([f"({SHORT[c]}) {c}" for c in loss_configs], fontsize=7, rotation=25, ha="right")
        ax.margins(y=0.18)
        ax.set_ylabel("time, median (ms)")
        ax.set_title("the loss alone (forward + backward): backbone vs statistics", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        notes = sorted({f"({SHORT.get(r['config'], '?')}) {r['config']}: {r['note'] or r['status']}"
                        for r in group if r["part"] == "step" and r["status"] != "ok"})
        if notes:
            fig.text(0.01, 0.005, "not measured: " + "; ".join(notes), fontsize=7, color="dimgray")
        fig.suptitle(f"Loss overhead in a training step: {net}, batch {batch} at {height}x{width}, float32\n"
                     f"{device} | torch {group[0]['torch']} | commit {group[0]['commit']} | {group[0]['date']}",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        path = Path(out_dir) / f"loss_overhead_{common.slug(device)}_b{batch}_{height}x{width}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# --- main ----------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int, int]:
    """``BxS`` (square) or ``BxHxW``."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 2:
        return parts[0], parts[1], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise argparse.ArgumentTypeError(f"size must be BxS or BxHxW, got {text!r}")


def timm_version() -> str:
    try:
        return import_timm().__version__
    except Exception:
        return "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: batch 2 at 64x64, DnCNN 6x32, 3 repeats (< 1 minute)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS, help="folder for the CSV and PNGs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--sizes", type=parse_size, nargs="+",
                        help="BxS or BxHxW (default: CUDA 8x256 16x128; CPU 4x96; quick 2x64)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--depth", type=int, default=None, help="DnCNN layers (default 17; quick 6)")
    parser.add_argument("--width", type=int, default=None, help="DnCNN channels (default 64; quick 32)")
    parser.add_argument("--location-layer", default="features.17",
                        help="VGG19 layer of the location-granularity configs (default relu3_4, stride 4)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per case (default CUDA 30, CPU 7, quick 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls per case (default CUDA 5, CPU 2, quick 1)")
    common.add_run_arguments(parser)
    args = parser.parse_args(argv)
    common.apply_commit_argument(args.commit)
    if args.plot_only:
        for path in draw_plots(args.out / CSV_NAME, args.out):
            print(f"plot: {path}")
        return 0
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)

    device = common.pick_device(args.device, args.quick, parser)
    on_cuda = device.type == "cuda"
    if args.sizes is None:
        args.sizes = [(2, 64, 64)] if args.quick else [(8, 256, 256), (16, 128, 128)] if on_cuda else [(4, 96, 96)]
    args.depth = args.depth or (6 if args.quick else 17)
    args.width = args.width or (32 if args.quick else 64)
    args.repeats = args.repeats or (3 if args.quick else 30 if on_cuda else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if on_cuda else 2)
    args.warmup = max(1, args.warmup)
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    meta = {**common.metadata(device), "timm": timm_version(), "run_id": uuid.uuid4().hex[:12]}
    net_name = f"DnCNN {args.depth}x{args.width} + Adam"
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | timm {meta['timm']} | "
          f"commit {meta['commit']} | threads {meta['threads']} | {net_name} | repeats {args.repeats}, "
          f"warm-up {args.warmup}")
    started = time.perf_counter()
    configs = list(args.configs)
    auxes, skipped = build_auxes(configs, args, device)
    for config, reason in skipped.items():
        print(f"note: config {config}: {reason}")

    rows: list[dict[str, Any]] = []
    csv_path = args.out / CSV_NAME
    for batch, height, width in args.sizes:
        base = {**meta, "net": net_name, "location_layer": args.location_layer, "dtype": "float32",
                "repeats": args.repeats, "warmup": args.warmup}
        cases = run_size(batch, height, width, configs, auxes, skipped, args, device)
        size_rows = rows_for_size(cases, batch, height, width, base, args)
        print_size(size_rows, batch, height, width)
        common.append_rows(csv_path, size_rows, FIELDS)  # per size: a run cut short keeps what it measured
        rows += size_rows

    print(f"\nappended {len(rows)} rows to {csv_path}")
    print("\nissue-5 targets:")
    for line in evaluate_targets(rows, on_cuda):
        print("  " + line)
    if not args.no_plots:
        for path in draw_plots(csv_path, args.out):
            print(f"plot: {path}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

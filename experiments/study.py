"""Does D2SM help denoising, with which weight, depth and granularity, and how sure are we?

Paired trainings: for every seed, one DnCNN is trained with L1 alone and once more for every
D2SM configuration with ``L1 + weight * D2SM``, all from the same initialisation and on the
same batches (crops, flips and noise drawn from the seed). Every model is scored on the same
noisy test crops (several crops per test photograph, noise drawn once), and the study writes
one CSV row per (configuration, seed, metric) as soon as a run is measured: a killed study
keeps its rows, and a restarted one skips the runs already in the CSV.

The grid (12 D2SM configurations, each paired with the seed's L1 run):

* depth: a middle feature tap of MobileNetV2 (``blocks.2``, stride 8, 32 channels) and the
  deepest (``blocks.6``, stride 32, 320 channels);
* granularity: ``image`` with a memory queue of earlier batches, and ``location``;
* weight: chosen per (depth, granularity) so that, at initialisation, the D2SM gradient on the
  restored images is a given fraction of L1's: ``||d(w D2SM)/dx|| / ||dL1/dx||`` = 0.03,
  0.3 and 3 (``--ratios``). The ratio is measured on each seed's first batch with the
  seed's initial network; the weight is the target divided by its mean over the seeds,
  rounded to two significant digits, and each run's own ratio is written to the CSV.

Metrics: PSNR and SSIM, and the judgement of EfficientNet-Lite0 (not the loss's backbone):
KL(p_clean || p_restored) between class posteriors and top-1 agreement. ``study_report.py``
turns the CSV into paired differences with 95 % confidence intervals, a table and a plot.

    python -m experiments.study                      # CPU scale: about 40 min on 2 busy cores (2 shards)
    python -m experiments.study --scale gpu          # GPU scale: a bigger DnCNN, longer training
    python -m experiments.study_report               # table and plot from the CSV
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import d2sm_loss
from experiments.data import BUILTIN_TEST, load_images, random_crops
from experiments.degradations import add_gaussian_noise
from experiments.evaluation import EVAL_SEED, Evaluator, fidelity
from experiments.models import DnCNN
from experiments.provenance import collect_environment
from experiments.training import backbone_weights, batches, train

RESULTS = Path(__file__).resolve().parent / "results"
DEPTHS = {"middle": 2, "deepest": -1}  # MobileNetV2 feature taps: blocks.2 and blocks.6
GRANULARITIES = ("image", "location")
COLUMNS = (
    "study", "config", "seed", "metric", "value", "loss", "depth", "layer", "granularity", "queue_size",
    "target_ratio", "weight", "steps", "batch_size", "crop", "lr", "sigma", "model", "test_crops",
    "backbone", "backbone_weights", "device", "torch", "timm", "d2sm_loss", "commit", "date",
)
SCALES = {
    # the CPU: 3 seeds x 13 runs in about 40 minutes on 2 busy cores (two --shard processes)
    "cpu": dict(device="cpu", seeds=3, steps=300, batch_size=8, crop=64, depth=5, width=16, queue_size=32,
                test_per_image=12, test_crop=128),
    # a GPU session: a DnCNN of the paper's size, longer training, more seeds and test crops
    "gpu": dict(device="cuda", seeds=5, steps=3000, batch_size=16, crop=96, depth=17, width=64, queue_size=64,
                test_per_image=20, test_crop=192),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu", help="defaults for the options below")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV (default experiments/results/study_denoising[_gpu].csv)")
    parser.add_argument("--device")
    parser.add_argument("--seeds", type=int, help="seeds 0 .. N-1")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--crop", type=int, help="training crop size")
    parser.add_argument("--depth", type=int, help="DnCNN layers")
    parser.add_argument("--width", type=int, help="DnCNN channels")
    parser.add_argument("--queue-size", type=int, help="memory queue at image granularity")
    parser.add_argument("--test-per-image", type=int, help="test crops per test photograph")
    parser.add_argument("--test-crop", type=int, help="test crop size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0..255 scale")
    parser.add_argument("--ratios", default="0.03,0.3,3", help="target gradient ratios D2SM/L1 at initialisation")
    parser.add_argument("--depths", default=",".join(DEPTHS), help="subset of " + ",".join(DEPTHS))
    parser.add_argument("--granularities", default=",".join(GRANULARITIES), help="subset of " + ",".join(GRANULARITIES))
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--backbone-weights", default=None, help="checkpoint path or package:NAME")
    parser.add_argument("--random-backbone", action="store_true", help="random backbone and judge: smoke tests only")
    parser.add_argument("--evaluator-weights", default=None)
    parser.add_argument("--ratio-trace", action="store_true",
                        help="instead of the study: the gradient ratio at weight 1 along an L1 training of seed 0")
    parser.add_argument("--shard", default="0/1",
                        help="'i/n': run only the runs whose index is i modulo n, for n processes sharing one CSV")
    args = parser.parse_args(argv)
    for key, value in SCALES[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = RESULTS / f"study_denoising{'' if args.scale == 'cpu' else '_' + args.scale}.csv"
    shard, shards = (int(v) for v in args.shard.split("/"))
    if not 0 <= shard < shards:
        parser.error(f"--shard: expected i/n with 0 <= i < n, got {args.shard!r}")
    args.shard = (shard, shards)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.depths = [d for d in args.depths.split(",") if d]
    args.granularities = [g for g in args.granularities.split(",") if g]
    for depth in args.depths:
        if depth not in DEPTHS:
            parser.error(f"--depths: {depth!r} is not one of {tuple(DEPTHS)}")
    for granularity in args.granularities:
        if granularity not in GRANULARITIES:
            parser.error(f"--granularities: {granularity!r} is not one of {GRANULARITIES}")
    return args


def config_name(depth: str, granularity: str, ratio: float) -> str:
    return f"d2sm_{depth}_{granularity}_r{ratio:g}"


def criterion_for(args: argparse.Namespace, depth: str, granularity: str) -> d2sm_loss.SemanticStatisticsLoss:
    weights, _ = backbone_weights(args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random.*")  # asked for, and stamped in the CSV
        return d2sm_loss.SemanticStatisticsLoss(
            args.backbone, layers=[DEPTHS[depth]], granularity=granularity,
            queue_size=args.queue_size if granularity == "image" else 0, **weights,
        )


def initial_model(args: argparse.Namespace, seed: int) -> DnCNN:
    torch.manual_seed(seed)
    return DnCNN(depth=args.depth, width=args.width)


def gradient_ratio(model: DnCNN, criterion: torch.nn.Module, degraded: Tensor, clean: Tensor) -> float:
    """``||dD2SM/dx|| / ||dL1/dx||`` on the restored images ``x = model(degraded)``
    (:func:`d2sm_loss.gradient_ratio`)."""
    restored = model(degraded).detach().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*outside input_range.*")  # unclipped noisy images
        return d2sm_loss.gradient_ratio(criterion(restored, clean), F.l1_loss(restored, clean), restored)


def round_significant(value: float, digits: int = 2) -> float:
    return float(f"{value:.{digits - 1}e}")


def calibrate(args, train_set, noise, seeds, device) -> dict[tuple[str, str], dict[int, float]]:
    """The ratio at weight 1 for each (depth, granularity) and seed: the seed's initial network
    on the seed's first training batch."""
    ratios: dict[tuple[str, str], dict[int, float]] = {}
    for depth in args.depths:
        for granularity in args.granularities:
            criterion = criterion_for(args, depth, granularity).to(device)
            ratios[depth, granularity] = {}
            for seed in seeds:
                model = initial_model(args, seed).to(device).train()
                degraded, clean = next(batches(train_set, noise, args.batch_size, args.crop, seed=seed))
                ratio = gradient_ratio(model, criterion, degraded.to(device), clean.to(device))
                ratios[depth, granularity][seed] = ratio
                criterion.reset_queue()  # each seed's ratio on an empty queue
    return ratios


def ratio_trace(args, train_set, noise, device) -> list[list[float]]:
    """Print ``||dD2SM/dx|| / ||dL1/dx||`` at weight 1 for each (depth, granularity) on the
    seed-0 network after 0, steps/30, steps/10, steps/3 and ``--steps`` L1 training steps (on
    the batch of that step), to show how far the ratio at initialisation is from the ratio
    later in training. Returns the printed rows (step, ratios...)."""
    checkpoints = sorted({0, args.steps // 30, args.steps // 10, args.steps // 3, args.steps})
    rows = []
    criteria = {(d, g): criterion_for(args, d, g).to(device) for d in args.depths for g in args.granularities}
    model = initial_model(args, 0).to(device)
    data = batches(train_set, noise, args.batch_size, args.crop, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print("steps  " + "  ".join(f"{d}/{g}" for d, g in criteria), flush=True)
    for step in range(args.steps + 1):
        degraded, clean = (t.to(device) for t in next(data))
        if step in checkpoints:
            ratios = []
            for criterion in criteria.values():
                criterion.reset_queue()  # an empty queue, as at initialisation
                ratios.append(gradient_ratio(model, criterion, degraded, clean))
            print(f"{step:5d}  " + "  ".join(f"{r:10.3g}" for r in ratios), flush=True)
            rows.append([step, *ratios])
        if step == args.steps:
            return rows
        loss = F.l1_loss(model(degraded), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def make_test_crops(args) -> tuple[Tensor, Tensor]:
    """Clean and noisy test crops: ``--test-per-image`` random crops of every test photograph,
    noise drawn once from a fixed seed (identical for every run)."""
    _, test_set = load_images()
    rng = torch.Generator().manual_seed(EVAL_SEED)
    clean = torch.stack([s.clean for s in random_crops(test_set, args.test_per_image, args.test_crop, rng)])
    return clean, add_gaussian_noise(clean, args.sigma / 255, rng)


@torch.no_grad()
def score(images: Tensor, clean: Tensor, clean_log_probs: Tensor, evaluator: Evaluator) -> dict[str, float]:
    """Mean PSNR, SSIM, KL(p_clean || p_image) and top-1 agreement over the test crops."""
    pixel = [fidelity(c, r) for c, r in zip(clean, images)]
    log_probs = torch.cat([evaluator.log_probs(chunk) for chunk in images.clamp(0, 1).split(32)])
    kl = (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(-1)
    agree = (log_probs.argmax(-1) == clean_log_probs.argmax(-1)).double()
    return {
        "psnr": sum(p["psnr"] for p in pixel) / len(pixel),
        "ssim": sum(p["ssim"] for p in pixel) / len(pixel),
        "kl": float(kl.mean()),
        "top1_agreement": float(agree.mean()),
    }


def done_runs(path: Path) -> set[tuple[str, str]]:
    """(config, seed) pairs whose rows are all in the CSV already."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        metrics: dict[tuple[str, str], set[str]] = {}
        for row in csv.DictReader(f):
            metrics.setdefault((row["config"], row["seed"]), set()).add(row["metric"])
    return {key for key, found in metrics.items() if {"psnr", "ssim", "kl", "top1_agreement"} <= found
            or "diverged" in found}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows under an exclusive lock (several studies may share one CSV); the header is
    written when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> Path | None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    started = time.perf_counter()
    environment = collect_environment(device)
    seeds = list(range(args.seeds))
    train_set, _ = load_images()
    noise = lambda clean, rng: add_gaussian_noise(clean, args.sigma / 255, rng)  # noqa: E731
    if args.ratio_trace:
        ratio_trace(args, train_set, noise, device)
        return None
    evaluator = Evaluator(device, random=args.random_backbone, weights=args.evaluator_weights)
    clean, noisy = make_test_crops(args)
    clean_log_probs = torch.cat([evaluator.log_probs(chunk) for chunk in clean.split(32)])
    common = {
        "study": "denoising", "steps": args.steps, "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr,
        "sigma": args.sigma, "model": f"DnCNN {args.depth}x{args.width}",
        "test_crops": f"{len(clean)} ({args.test_per_image} x {args.test_crop}px of {len(BUILTIN_TEST)} photos)",
        "backbone": args.backbone, "backbone_weights": backbone_weights(args)[1],
        **{k: environment[k] for k in ("device", "torch", "timm", "d2sm_loss", "commit", "date")},
    }
    done = done_runs(args.out)

    if ("noisy_input", "") not in done:
        append_rows(args.out, [{**common, "config": "noisy_input", "seed": "", "loss": "none", "metric": m, "value": v}
                               for m, v in score(noisy, clean, clean_log_probs, evaluator).items()])
    print(f"calibrating the loss weights on {len(seeds)} seeds ...", flush=True)
    at_weight_one = calibrate(args, train_set, noise, seeds, device)
    grid = []
    for depth in args.depths:
        for granularity in args.granularities:
            mean_ratio = sum(at_weight_one[depth, granularity].values()) / len(seeds)
            for target in args.ratios:
                grid.append((depth, granularity, target, round_significant(target / mean_ratio)))
    for depth, granularity, target, weight in grid:
        print(f"  {config_name(depth, granularity, target):28s} weight {weight:.3g}", flush=True)

    runs = [(seed, *job) for seed in seeds for job in [(None, None, None, 0.0)] + grid]
    for index, (seed, depth, granularity, target, weight) in enumerate(runs):
        name = "l1" if depth is None else config_name(depth, granularity, target)
        if (name, str(seed)) in done or index % args.shard[1] != args.shard[0]:
            continue
        t0 = time.perf_counter()
        if depth is None:
            criterion = criterion_for(args, "deepest", "image").to(device)  # only measured in the L1 run
        else:
            torch.manual_seed(seed)
            criterion = criterion_for(args, depth, granularity).to(device)
        model = initial_model(args, seed).to(device)
        data = batches(train_set, noise, args.batch_size, args.crop, seed=seed)
        config = {"config": name, "seed": seed, "loss": "l1", "depth": "", "layer": "", "granularity": "",
                  "queue_size": "", "target_ratio": "", "weight": weight}
        if depth is not None:
            config.update(loss="l1+d2sm", depth=depth, layer=criterion.layers[0], granularity=granularity,
                          queue_size=criterion.queue_size, target_ratio=target)
        try:
            model, run = train(model, criterion, data, weight, steps=args.steps, lr=args.lr, device=device,
                               log_every=max(1, args.steps), label=name, progress=False)
        except FloatingPointError as error:  # recorded, and the study goes on
            append_rows(args.out, [{**common, **config, "metric": "diverged", "value": 1}])
            print(f"seed {seed} {name}: {error}", flush=True)
            continue
        with torch.no_grad():
            restored = torch.cat([model(chunk.to(device)).cpu() for chunk in noisy.split(16)])
        metrics = score(restored, clean, clean_log_probs, evaluator)
        tail = run["history"]["l1"][-max(1, args.steps // 10):]
        metrics.update(final_l1=sum(tail) / len(tail), train_seconds=run["train_seconds"])
        if depth is not None:
            metrics["grad_ratio_init"] = weight * at_weight_one[depth, granularity][seed]
        append_rows(args.out, [{**common, **config, "metric": m, "value": v} for m, v in metrics.items()])
        print(f"seed {seed} {name:28s} psnr {metrics['psnr']:.3f} kl {metrics['kl']:.4f} "
              f"top1 {metrics['top1_agreement']:.3f}  {time.perf_counter() - t0:.0f}s "
              f"(total {time.perf_counter() - started:.0f}s)", flush=True)
    print(f"done in {time.perf_counter() - started:.0f}s: {args.out}")
    return args.out


if __name__ == "__main__":
    main()

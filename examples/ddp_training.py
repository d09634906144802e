"""Multi-process training with the D2SM loss under DistributedDataParallel.

A DnCNN denoiser trained on random crops of the built-in photographs (or ``--data DIR``)
with ``L1 + weight * SemanticStatisticsLoss``, one process per GPU (NCCL) or per CPU
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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from d2sm_loss import SemanticStatisticsLoss
from experiments.data import load_images, sample_batch
from experiments.degradations import add_gaussian_noise
from experiments.models import DnCNN
from experiments.training import backbone_weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--data", help="folder of clean training images (default: built-in photographs)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--pool", type=int, default=512, help="number of training crops in the dataset")
    parser.add_argument("--sigma", type=float, default=25.0, help="noise sigma on the 0..255 scale")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss-weight", type=float, default=0.1)
    parser.add_argument("--queue-size", type=int, default=32)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--backbone-weights", help="local checkpoint for the loss's backbone")
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
        train, _ = load_images(args.data)
        clean, _ = sample_batch(train, args.pool, args.crop, 1, generator)
        sampler = DistributedSampler(TensorDataset(clean), shuffle=True, seed=0)
        loader = DataLoader(TensorDataset(clean), batch_size=args.batch_size, sampler=sampler, drop_last=False)

        torch.manual_seed(0)
        model = DistributedDataParallel(
            DnCNN(depth=8, width=32).to(device), device_ids=[device.index] if device.type == "cuda" else None
        )
        weights, weights_source = backbone_weights(args)
        criterion = SemanticStatisticsLoss(args.backbone, queue_size=args.queue_size, **weights).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        noise = torch.Generator().manual_seed(1000 + rank)

        history, step, epoch, start = [], 0, 0, time.perf_counter()
        while step < args.steps:
            sampler.set_epoch(epoch)
            for (batch,) in loader:
                batch = batch.to(device)
                noisy = add_gaussian_noise(batch.cpu(), args.sigma / 255, noise).to(device)
                restored = model(noisy)
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

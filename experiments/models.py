"""Small published restoration networks that train on a CPU."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from experiments.degradations import bicubic_upsample


class DnCNN(nn.Module):
    """DnCNN (Zhang et al., TIP 2017): conv+ReLU, (depth - 2) x conv+BN+ReLU, conv; predicts the
    noise and subtracts it (residual learning). The paper's colour model has depth 20, width 64."""

    def __init__(self, depth: int = 17, width: int = 64, channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, noisy: Tensor) -> Tensor:
        return noisy - self.body(noisy)


class ESPCN(nn.Module):
    """ESPCN (Shi et al., CVPR 2016): conv5x5-64, tanh, conv3x3-32, tanh, conv3x3-(3 r^2), pixel
    shuffle. Unlike the paper (Y channel only) it works on RGB and adds the bicubic upsampling of
    the input, so the network learns the residual (faster to train on a CPU)."""

    def __init__(self, scale: int, width: int = 64, channels: int = 3):
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2), nn.Tanh(),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.Tanh(),
            nn.Conv2d(width // 2, channels * scale**2, 3, padding=1),
            nn.PixelShuffle(scale),
        )

    def forward(self, low: Tensor) -> Tensor:
        return bicubic_upsample(low, self.scale) + self.body(low)


class AODNet(nn.Module):
    """AOD-Net (Li et al., ICCV 2017): five small convolutions with concatenations estimate K(x),
    and the clean image is ``J = ReLU(K(x) * I - K(x) + b)`` with b = 1 (1.8 k parameters)."""

    def __init__(self, b: float = 1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 3, 5, padding=2)
        self.conv4 = nn.Conv2d(6, 3, 7, padding=3)
        self.conv5 = nn.Conv2d(12, 3, 3, padding=1)
        self.b = b

    def forward(self, hazy: Tensor) -> Tensor:
        x1 = F.relu(self.conv1(hazy))
        x2 = F.relu(self.conv2(x1))
        x3 = F.relu(self.conv3(torch.cat([x1, x2], 1)))
        x4 = F.relu(self.conv4(torch.cat([x2, x3], 1)))
        k = F.relu(self.conv5(torch.cat([x1, x2, x3, x4], 1)))
        return F.relu(k * hazy - k + self.b)

"""The restoration network the training-step benchmark trains: a DnCNN-style denoiser."""

from __future__ import annotations

from torch import Tensor, nn


class DnCNN(nn.Module):
    """DnCNN (Zhang et al., TIP 2017): conv+ReLU, ``depth - 2`` x (conv+BN+ReLU), conv, all
    3 x 3 with ``width`` channels; predicts the noise and subtracts it. About
    ``2 * 9 * width^2 * (depth - 2)`` FLOPs per pixel forward."""

    def __init__(self, depth: int = 17, width: int = 64, channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, noisy: Tensor) -> Tensor:
        return noisy - self.body(noisy)

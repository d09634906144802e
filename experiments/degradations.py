"""Degradations, batched on (B, 3, H, W) tensors in [0, 1], randomness from an explicit generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def add_gaussian_noise(
    clean: Tensor, sigma: float | tuple[float, float], generator: torch.Generator
) -> Tensor:
    """Additive white Gaussian noise, ``sigma`` on the [0, 1] scale (25/255 is the usual
    ``sigma = 25``). A ``(low, high)`` pair draws one sigma per image uniformly (blind denoising).
    The result is not clipped to [0, 1] (the DnCNN/FFDNet convention)."""
    if isinstance(sigma, (tuple, list)):
        low, high = sigma
        sigmas = low + (high - low) * torch.rand(clean.shape[0], generator=generator)
    else:
        sigmas = torch.full((clean.shape[0],), float(sigma))
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
    return clean + noise * sigmas.view(-1, 1, 1, 1).to(clean.dtype)


def bicubic_downsample(image: Tensor, scale: int) -> Tensor:
    """Bicubic downsampling by an integer factor with antialiasing (the resize MATLAB's
    ``imresize`` and PIL perform), clipped to [0, 1]. H and W must be multiples of ``scale``."""
    h, w = image.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {(h, w)} is not a multiple of scale {scale}")
    low = F.interpolate(image, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return low.clamp(0, 1)


def bicubic_upsample(image: Tensor, scale: int) -> Tensor:
    h, w = image.shape[-2:]
    return F.interpolate(image, size=(h * scale, w * scale), mode="bicubic", align_corners=False)


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur (radius 3 sigma, replicate padding), per channel."""
    radius = max(1, int(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = image.shape[1]
    out = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def depth_proxy(clean: Tensor) -> Tensor:
    """A stand-in scene depth in [0, 1], shape (B, 1, H, W), for images without depth maps:

    ``d = normalise(0.5 * v + 0.5 * blur(luminance))``, where ``v`` runs linearly from 1 at the
    top row to 0 at the bottom row (the horizon is usually far, the ground near) and the
    luminance (Rec. 601) is blurred with a Gaussian of sigma = 5 % of the shorter side (bright,
    smooth regions such as sky read as far). Each image is min-max normalised to [0, 1].
    """
    b, _, h, w = clean.shape
    vertical = torch.linspace(1.0, 0.0, h, dtype=clean.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    luminance = (0.299 * clean[:, 0] + 0.587 * clean[:, 1] + 0.114 * clean[:, 2]).unsqueeze(1)
    smooth = gaussian_blur(luminance, sigma=max(1.0, 0.05 * min(h, w)))
    depth = 0.5 * vertical + 0.5 * smooth
    low = depth.amin(dim=(2, 3), keepdim=True)
    high = depth.amax(dim=(2, 3), keepdim=True)
    return (depth - low) / (high - low).clamp_min(1e-6)


def add_haze(
    clean: Tensor,
    generator: torch.Generator,
    beta_range: tuple[float, float] = (0.5, 1.5),
    airlight_range: tuple[float, float] = (0.7, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """Atmospheric scattering model ``I = J t + A (1 - t)`` with ``t = exp(-beta d)``.

    ``d`` is :func:`depth_proxy`; per image, ``beta`` ~ U(beta_range) and a grey airlight
    ``A`` ~ U(airlight_range). Returns ``(hazy, t, A)``; ``t`` lies in [exp(-beta), 1].
    """
    b = clean.shape[0]
    beta = beta_range[0] + (beta_range[1] - beta_range[0]) * torch.rand(b, generator=generator)
    airlight = airlight_range[0] + (airlight_range[1] - airlight_range[0]) * torch.rand(b, generator=generator)
    beta = beta.view(b, 1, 1, 1).to(clean.dtype)
    airlight = airlight.view(b, 1, 1, 1).to(clean.dtype)
    t = torch.exp(-beta * depth_proxy(clean))
    return clean * t + airlight * (1 - t), t, airlight

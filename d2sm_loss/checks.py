"""One-line argument checks shared by :class:`~d2sm_loss.SemanticStatisticsLoss` and
:func:`~d2sm_loss.functional.similarity_kl`.

Each check takes the argument's name and value, raises ``TypeError`` (wrong kind of
value) or ``ValueError`` (right kind, bad value) with a message that names the argument
and says what was expected, and returns the value in a canonical Python type. Numbers may
be given as Python numbers, NumPy scalars or 0-d tensors; ``bool`` is never taken for a
number. Option checks run on the host only (no tensor data is read), so they cost nothing
inside a compiled training step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .rows import LayerRows

__all__ = [
    "InputSizeError",
    "SWAPPED_MESSAGE",
    "check_bool",
    "check_call_images",
    "check_choice",
    "check_mapping",
    "check_patch_size",
    "check_recomputation",
    "check_number",
    "check_int",
    "check_numbers",
    "check_range",
    "check_int_pair",
    "check_images",
    "check_pair",
    "check_values",
    "range_message",
]


class InputSizeError(ValueError):
    """Images or batches too small for the statistic. ``remedy`` says what to enlarge:
    ``"image"`` (the image or crop size) or ``"batch"`` (the images per step), so that a
    framework adapter (:mod:`d2sm_loss.integrations`) can name its own config key."""

    def __init__(self, message: str, remedy: str = "") -> None:
        super().__init__(message)
        self.remedy = remedy


def _scalar(value: Any) -> Any:
    """A 0-d tensor or NumPy scalar as a Python number; anything else unchanged."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad:
        return value.item()
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be a ``bool`` (``numpy.bool_`` accepted)."""
    value = _scalar(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)} ({type(value).__name__})")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str], hint: str = "") -> str:
    """``value`` must be one of the strings ``choices`` (``hint``: appended to the error)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {_describe(value)}{hint}")
    return value


def check_mapping(name: str, value: Any) -> None:
    """``value`` must be a mapping (of keyword arguments)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of keyword arguments, got {type(value).__name__}")


def check_number(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    non_negative: bool = False,
    finite: bool = True,
) -> float:
    """A real number (not a bool), finite unless ``finite=False``; returned as ``float``."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(value)} ({type(value).__name__})")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if positive and not number > 0:
        raise ValueError(f"{name} must be positive, got {number}")
    if non_negative and not number >= 0:
        raise ValueError(f"{name} must be non-negative, got {number}")
    return number


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """An integer (not a bool; a float such as ``4.0`` is refused), at least ``minimum``."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)} ({type(value).__name__})")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def _sequence(name: str, value: Any, what: str) -> list[Any]:
    if isinstance(value, Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be a sequence of {what}, got a tensor of shape {tuple(value.shape)}")
        return value.tolist()
    scalar = getattr(value, "ndim", None) == 0  # a NumPy scalar or 0-d array: its tolist() is a number
    if (
        scalar
        or isinstance(value, (str, bytes))
        or not isinstance(value, (Sequence, range)) and not hasattr(value, "tolist")
    ):
        raise TypeError(f"{name} must be a sequence of {what}, got {_describe(value)} ({type(value).__name__})")
    return list(value.tolist() if hasattr(value, "tolist") else value)


def check_numbers(
    name: str,
    value: Any,
    *,
    length: int | None = None,
    positive: bool = False,
    non_negative: bool = False,
) -> list[float]:
    """A sequence (list, tuple, 1-d array or tensor) of finite numbers, of ``length`` if given."""
    items = _sequence(name, value, "numbers")
    if length is not None and len(items) != length:
        raise ValueError(f"{name} must have {length} values, got {len(items)}: {_describe(value)}")
    return [
        check_number(f"{name}[{i}]", item, positive=positive, non_negative=non_negative) for i, item in enumerate(items)
    ]


def check_range(name: str, value: Any) -> tuple[float, float]:
    """``(low, high)``: two finite numbers with ``low < high``."""
    low, high = check_numbers(name, value, length=2)
    if not low < high:
        raise ValueError(f"{name} must be (low, high) with low < high, got {_describe(value)}")
    return low, high


def check_int_pair(name: str, value: Any, *, minimum: int = 1) -> tuple[int, int]:
    """An int (used for both sides) or a pair ``(h, w)`` of ints, each at least ``minimum``."""
    scalar = _scalar(value)
    if isinstance(scalar, numbers.Integral) and not isinstance(scalar, bool):
        side = check_int(name, scalar, minimum=minimum)
        return side, side
    items = _sequence(name, value, "ints")
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {_describe(value)}")
    return check_int(f"{name}[0]", items[0], minimum=minimum), check_int(f"{name}[1]", items[1], minimum=minimum)


def check_images(name: str, images: Any) -> None:
    """A floating-point ``(B, C, H, W)`` tensor with ``B >= 1`` and ``C`` 1 or 3."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {images.dim()} dims: {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(images.shape)}): there is nothing to compare")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {images.dtype}")


#: The warning for a call whose clean images require grad while the restored ones do not.
SWAPPED_MESSAGE = (
    "SemanticStatisticsLoss: `clean` requires grad but `restored` does not. The restored images "
    "come first, criterion(restored, clean); with the arguments swapped the loss sends no gradient "
    "to the network. (Warned once.)"
)


def check_call_images(restored: Any, clean: Any, device: torch.device) -> bool:
    """The images of a call: two batches (:func:`check_images`) of one shape on the loss's
    ``device``. Returns whether they look swapped (see :data:`SWAPPED_MESSAGE`)."""
    check_images("restored", restored)
    check_images("clean", clean)
    check_pair(restored, clean)
    if restored.device != device:
        raise ValueError(
            f"the images are on {restored.device} but the loss's backbone is on {device}: "
            "move the loss with criterion.to(device)"
        )
    return bool(clean.requires_grad and not restored.requires_grad)


def check_recomputation(*, queue: bool, gathers: bool) -> None:
    """A training call inside a backward pass is activation checkpointing's recomputation
    (``torch.utils.checkpoint``). With a memory queue (pushed since the original call) or a
    gather across ranks (a collective inside the backward) it would not repeat the original
    call: a ``RuntimeError``. Without either the call is a pure function of its images."""
    task = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside a backward pass
    if torch.compiler.is_compiling() or task is None or task() == -1:
        return
    reasons = [reason for reason, applies in (
        ("the memory queue is not as the original call saw it (a training call pushes its batch)", queue),
        ("it would gather rows across ranks inside the backward pass", gathers),
    ) if applies]
    if reasons:
        raise RuntimeError(
            "SemanticStatisticsLoss was called again inside a backward pass: activation checkpointing "
            f"(torch.utils.checkpoint) recomputes the block that calls the loss, and {' and '.join(reasons)}, so "
            "the recomputed gradient would be wrong. Keep the loss call outside the checkpointed block: checkpoint "
            "the network, e.g. restored = checkpoint(net, lq, use_reentrant=False); loss = criterion(restored, "
            "clean)."
        )


def check_pair(restored: Tensor, clean: Tensor) -> None:
    """``restored`` and ``clean`` (already tensors) have the same shape and device."""
    if restored.shape != clean.shape:
        raise ValueError(
            f"restored and clean must have the same shape, got {tuple(restored.shape)} and {tuple(clean.shape)}"
        )
    if restored.device != clean.device:
        raise ValueError(f"restored and clean must be on the same device, got {restored.device} and {clean.device}")


def check_values(
    restored: Tensor, clean: Tensor, rows: Sequence[LayerRows], input_range: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    """Check the values of a call in one device synchronisation.

    Raises ``ValueError`` for NaN or inf images, and for features that are not finite
    although the images are (they overflowed inside the backbone). Returns the batches
    (``"restored"``, ``"clean"``) with values outside ``input_range`` (beyond a tolerance of
    1e-3 of its width), each with its observed ``(min, max)``, for the caller to warn about.
    """
    low, high = input_range
    tolerance = 1e-3 * (high - low)
    flags = [~torch.isfinite(restored.detach()).all(), ~torch.isfinite(clean.detach()).all()]
    for layer_rows in rows:
        flags.append(~torch.isfinite(layer_rows.restored.detach()).all())
        flags.append(~torch.isfinite(layer_rows.clean).all())
    extrema = [v.float() for tensor in (restored.detach(), clean.detach()) for v in tensor.aminmax()]
    *flags_, low_x, high_x, low_y, high_y = torch.stack([f.float() for f in flags] + extrema).tolist()  # one sync
    bad_restored, bad_clean, *bad_rows = (bool(f) for f in flags_)
    range_restored = low_x < low - tolerance or high_x > high + tolerance
    range_clean = low_y < low - tolerance or high_y > high + tolerance
    if bad_restored or bad_clean:
        which = " and ".join(n for n, b in (("restored", bad_restored), ("clean", bad_clean)) if b)
        raise ValueError(f"{which} contains NaN or inf values (pass check_inputs=False to skip this check)")
    for index, layer_rows in enumerate(rows):
        bad_x, bad_y = bad_rows[2 * index], bad_rows[2 * index + 1]
        if bad_x or bad_y:
            which = " and ".join(n for n, b in (("restored", bad_x), ("clean", bad_y)) if b)
            raise ValueError(
                f"the backbone's features of layer {layer_rows.layer!r} for the {which} images are not finite "
                f"although the images are: the values overflow inside the backbone. Check input_range="
                f"{input_range} against your images' range, and run the backbone in float32."
            )
    observed = {"restored": (range_restored, (low_x, high_x)), "clean": (range_clean, (low_y, high_y))}
    return {name: extent for name, (outside, extent) in observed.items() if outside}


def range_message(outside: Mapping[str, tuple[float, float]], input_range: tuple[float, float]) -> str:
    """The warning about values outside ``input_range`` (``outside`` as :func:`check_values`
    returns it): the observed ranges, and whether it matters. Clean images come from the data,
    so clean values outside mean the data are in another range (the loss is wrong); restored
    values outside alone are the network's output, usual in the first steps of training."""
    seen = ", ".join(f"{name} values span [{low:.4g}, {high:.4g}]" for name, (low, high) in outside.items())
    if "clean" not in outside:
        return (
            f"SemanticStatisticsLoss: restored images outside input_range={input_range} ({seen}): the network's "
            "output, harmless in early steps; if it persists, clamp the output or check its range. (Warned once.)"
        )
    return (
        f"SemanticStatisticsLoss: the clean images are outside input_range={input_range} ({seen}), so the features "
        "and the loss are wrong: set input_range to your data's range, e.g. (0, 255). (Warned once.)"
    )


def check_layer_weights(layer_weights: Any) -> list[float]:
    """One finite non-negative weight per layer, not all 0 (the loss would be identically 0)."""
    weights = check_numbers("layer_weights", layer_weights, non_negative=True)
    if not weights:
        raise ValueError("layer_weights must hold one weight per layer, got an empty sequence")
    if not any(weights):
        raise ValueError(f"layer_weights are all 0, which makes the loss identically 0: got {weights}")
    return weights


def check_patch_size(patch_size: int, extractor: Any, layers: Any) -> None:
    """Crops of ``patch_size`` are at least the chosen layers' downsampling factor."""
    if patch_size < extractor.min_size():
        raise ValueError(
            f"patch_size={patch_size} is too small for layers {layers} of {extractor.name!r}: "
            f"each crop side must be at least {extractor.min_size()}"
        )


def check_image_size(size: Sequence[int], extractor: Any, *, patch_size: int | None, layers: Any) -> None:
    """Images of ``size`` (H, W) fit the backbone: each side at least the chosen layers'
    downsampling factor (or ``patch_size`` when cutting patches), and exactly the size a
    transformer with a fixed input size takes (the patches' size at patch granularity)."""
    height, width = int(size[0]), int(size[1])
    need = patch_size if patch_size is not None else extractor.min_size()
    if min(height, width) < need:
        what = f"patch_size={patch_size}" if patch_size is not None else f"layers {layers}"
        change = "a smaller patch_size" if patch_size is not None else "a shallower layer (layers=...)"
        raise InputSizeError(
            f"images of size {height}x{width} are too small for {what}: each side must be at least {need}. Use "
            f"larger images or crops or {change}",
            remedy="image",
        )
    multiple = getattr(extractor, "patch_multiple", None)
    if multiple is not None and patch_size is None and (height % multiple[0] or width % multiple[1]):
        raise ValueError(
            f"images of size {height}x{width} do not fit backbone {extractor.name!r}: its patches are "
            f"{multiple[0]}x{multiple[1]}, so each side must be a multiple of {multiple[0]} (crop to e.g. "
            f"{multiple[0] * max(1, height // multiple[0])}x{multiple[1] * max(1, width // multiple[1])}), or pass "
            "backbone_kwargs={'dynamic_img_size': True, 'dynamic_img_pad': True} to pad them"
        )
    required = extractor.required_size
    if required is None:
        return
    if patch_size is None and (height, width) != tuple(required):
        raise ValueError(
            f"backbone {extractor.name!r} takes images of exactly {required[0]}x{required[1]}, got "
            f"{height}x{width}: resize them, or pass backbone_kwargs={{'dynamic_img_size': True}}"
        )
    if patch_size is not None and (patch_size, patch_size) != tuple(required):
        raise ValueError(
            f"backbone {extractor.name!r} takes images of exactly {required[0]}x{required[1]}; set "
            f"patch_size={required[0]} or pass backbone_kwargs={{'dynamic_img_size': True}}"
        )

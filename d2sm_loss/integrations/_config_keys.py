"""The frameworks' config keys in the core's size errors.

The core says what to enlarge (:class:`~d2sm_loss.checks.InputSizeError`'s ``remedy``: the
images or the batch) in its own words; the adapters call the loss through
:func:`call_with_config_keys`, which adds the key of their framework's config that sets it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from ..checks import InputSizeError

__all__ = ["BASICSR_KEYS", "TRAINNER_KEYS", "call_with_config_keys"]

_Result = TypeVar("_Result")

#: The config entries of BasicSR (and its vendored copies) that set each remedy.
BASICSR_KEYS = {
    "image": "gt_size in BasicSR's datasets: train entry",
    "batch": "batch_size_per_gpu in BasicSR's datasets: train entry",
}
#: traiNNer-redux's entries (it crops the low-quality image: lq_size times the scale).
TRAINNER_KEYS = {
    "image": "lq_size in traiNNer-redux's datasets: train entry",
    "batch": "batch_size_per_gpu in traiNNer-redux's datasets: train entry",
}


def call_with_config_keys(
    keys: Mapping[str, str], function: Callable[..., _Result], *args: object, **kwargs: object
) -> _Result:
    """``function(*args, **kwargs)``; an :class:`~d2sm_loss.checks.InputSizeError` it raises is raised
    again with the config key of ``keys`` for its remedy appended."""
    try:
        return function(*args, **kwargs)
    except InputSizeError as error:
        key = keys.get(error.remedy)
        if key is None:
            raise
        raise InputSizeError(f"{error} (the config key: {key})", remedy=error.remedy) from None

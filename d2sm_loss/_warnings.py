"""Warnings attributed to the user's line: :func:`warn_user`."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

import torch

__all__ = ["warn_user"]

#: Frames skipped when a warning looks for the user's line: this package's and torch's own
#: (``nn.Module.__call__``, and torch.compile's frames around a compiled call).
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(str(module.__file__))) + os.sep
    for module in (sys.modules[__package__], torch)
)

#: Modules whose frames wrap a module's forward for a training framework (accelerate's
#: ``prepare`` wraps it in autocast and a float32 conversion): skipped as well.
_WRAPPER_MODULES = ("accelerate.utils.operations",)


def _internal(frame: FrameType) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS) or (
        frame.f_globals.get("__name__") in _WRAPPER_MODULES
    )


@torch.compiler.disable  # run eagerly under torch.compile: frames are not traceable
def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue ``message`` as a warning attributed to the user's line: the first caller
    outside this package, torch and framework forward wrappers (so that ``warnings`` filters
    and the printed location point at the call in the user's script, not into a library)."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and _internal(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

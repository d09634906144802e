"""Small helpers that read optional libraries and PyTorch switches.

:func:`import_timm` imports :mod:`timm` on first use, so that ``import d2sm_loss`` does not
import timm (and through it torchvision) before a backbone is built.

:func:`tf32_allowed` reads PyTorch's TF32 switch for float32 matrix products through
whichever of its two APIs the installed version has.
"""

from __future__ import annotations

from types import ModuleType

import torch

__all__ = ["import_timm", "tf32_allowed"]


def import_timm() -> ModuleType:
    """Import and return :mod:`timm` (a plain import, done when first needed)."""
    import timm

    return timm


def tf32_allowed() -> bool:
    """Whether PyTorch currently lets float32 CUDA matrix products use TF32.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (the API since torch 2.9, which
    also reflects the legacy ``allow_tf32`` / ``set_float32_matmul_precision`` switches;
    ``"none"`` inherits ``torch.backends.fp32_precision``), falling back to
    ``torch.get_float32_matmul_precision()`` on older versions. The legacy getter raises
    once the new API has been used, so it is not read first.
    """
    try:
        precision = torch.backends.cuda.matmul.fp32_precision
        if precision == "none":
            precision = torch.backends.fp32_precision
        return precision == "tf32"
    except (AttributeError, RuntimeError):
        return torch.get_float32_matmul_precision() != "highest"

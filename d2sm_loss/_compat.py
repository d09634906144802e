"""Switches read across versions and environments.

:func:`triton_interpreted` says whether Triton kernels run through its CPU interpreter.
:func:`tf32_allowed` reads PyTorch's TF32 switch for float32 matrix products through
whichever of its two APIs the installed version has.
"""

from __future__ import annotations

import os

import torch

__all__ = ["tf32_allowed", "triton_interpreted"]


def triton_interpreted() -> bool:
    """Whether ``TRITON_INTERPRET`` is set: Triton then runs kernels on CPU tensors through
    its interpreter (it must be set before the kernels' module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
            precision = torch.backends.fp32_precision  # type: ignore[attr-defined]
        return precision == "tf32"
    except (AttributeError, RuntimeError):
        return torch.get_float32_matmul_precision() != "highest"

"""Import helpers for environments whose torchvision does not match torch.

Some installs end up with a torchvision wheel whose compiled extension cannot load
against the installed torch (for example a CPU-only torch next to a CUDA build of
torchvision). Importing torchvision then fails with
``RuntimeError: operator torchvision::nms does not exist`` because its Python side
registers fake (meta) kernels for operators that the missing extension should have
defined. timm imports torchvision, so timm fails the same way.

:func:`import_timm` handles that single case: it declares the operator schemas, so
that the pure-Python parts of torchvision (models, transforms, feature extraction,
everything timm uses) import and run. The compiled operators themselves (``nms``,
``roi_align``, ...) stay unusable; calling one raises a clear error. On a normal
install, where torchvision's extension loads, nothing is changed.

:func:`tf32_allowed` reads PyTorch's TF32 switch for float32 matrix products through
whichever of its two APIs the installed version has.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

import torch

__all__ = ["import_timm", "tf32_allowed"]

# Schemas of torchvision's compiled operators, as its C++ extension declares them.
_TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
    "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

_stub_library: torch.library.Library | None = None


def _is_missing_operator_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "torchvision::" in str(error) and "does not exist" in str(error)


def _declare_torchvision_operators() -> None:
    """Declare torchvision's operator schemas that its extension failed to define."""
    global _stub_library
    if _stub_library is not None:
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_OP_SCHEMAS:
        try:
            library.define(schema)
        except RuntimeError:  # already declared by a partially loaded extension
            pass
    _stub_library = library


def _import_torchvision() -> ModuleType:
    try:
        import torchvision
    except RuntimeError as error:
        if not _is_missing_operator_error(error):
            raise
        # Drop the half-imported package and import it again with the schemas declared.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _declare_torchvision_operators()
        warnings.warn(
            "torchvision's compiled operators do not load with this torch build "
            f"(torch {torch.__version__}); d2sm_loss declared their schemas so that torchvision's "
            "pure-Python parts (models, transforms) and timm work. torchvision.ops.nms and the other "
            "compiled operators remain unavailable. Install matching torch/torchvision builds to "
            "silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """Import and return :mod:`timm`, working around a torchvision/torch build mismatch."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    _import_torchvision()
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

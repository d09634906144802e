"""Gathering feature rows across torch.distributed ranks, with autograd.

At image and patch granularity the statistic compares samples with each other, so
under DistributedDataParallel every rank gathers the rows of all ranks and computes the
statistic over the global batch. All ranks then hold the same rows in the same order
(rank 0's first), compute the same loss value, and update their queues identically.

Before any rows travel, the ranks exchange a small header of fixed size (:func:`exchange_headers`):
each rank's batch size, feature widths, dtype and image size and, with ``check_inputs``, whether its
images and features are finite. Ranks that disagree (images of another size, hence rows of another
width; another dtype) or hold non-finite inputs then raise the same ``ValueError`` on every rank,
naming the rank, instead of aborting inside the backend on mismatched buffers or blaming the wrong
rank.

Gradient convention: every rank computes the same loss ``L`` over the global batch;
the gradient that flows back to a rank's own rows is the exact partial derivative
``dL/dx_own`` multiplied by ``grad_scale``. With ``grad_scale = world_size`` (what
:class:`~d2sm_loss.SemanticStatisticsLoss` uses by default) DDP's averaging of
parameter gradients over ranks gives exactly the single-process update: the same
convention as a pixel loss averaged over each rank's local batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .rows import LayerRows

__all__ = [
    "distributed_world", "exchange_headers", "gather_batch_sizes", "gather_layer_rows", "gather_rows",
    "nonfinite_flags",
]

#: Dtypes by their code in the header; any other dtype has code len(_DTYPES).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: The header's fields, in order (one integer each).
_FIELDS = (
    "batch", "dtype", "layers", "widths", "width", "height", "image_width",
    "restored_images", "clean_images", "restored_features", "clean_features",
)


def distributed_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` when torch.distributed is initialised with several ranks, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def gather_batch_sizes(size: int, device: torch.device) -> list[int]:
    """Every rank's ``size`` (one small all-gather), so ranks may hold different batch sizes.

    The sizes are needed on the host to pad and split the rows, so this costs one device
    synchronisation per call (once per loss call, not per layer)."""
    local = torch.tensor([size], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return torch.cat(sizes).tolist()


def exchange_headers(
    rows: list[LayerRows], image_size: tuple[int, int], flags: Tensor | None = None
) -> list[dict[str, int]]:
    """Every rank's header (one all-gather of ``len(_FIELDS)`` integers, one synchronisation):
    batch size, dtype, number of layers, a digest of all layer widths, the first layer's width,
    the image size and ``flags`` (four 0/1 values: non-finite restored and clean images, then
    features; zeros when None), in rank order. Raises the same ``ValueError`` on every rank when
    ranks disagree on the widths or the dtype, or when a rank's flags are set.
    """
    first = rows[0].restored
    widths = tuple(int(r.restored.shape[-1]) for r in rows)
    code = _DTYPES.index(first.dtype) if first.dtype in _DTYPES else len(_DTYPES)
    digest = hash(widths) & 0x7FFFFFFF  # tuples of ints hash alike in every process
    fixed = [first.shape[0], code, len(rows), digest, widths[0], int(image_size[0]), int(image_size[1])]
    local = torch.tensor(fixed, dtype=torch.long, device=first.device)
    local = torch.cat([local, flags.to(first.device, torch.long) if flags is not None else local.new_zeros(4)])
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    headers = [dict(zip(_FIELDS, part)) for part in torch.stack(parts).tolist()]
    _check_headers(headers)
    return headers


def nonfinite_flags(restored: Tensor, clean: Tensor, rows: list[LayerRows]) -> Tensor:
    """Four 0-d flags on the device, without a synchronisation: restored and clean images that
    are not finite, then features of any of ``rows``' layers that are not finite (restored, clean;
    False without rows)."""
    def bad(tensors: list[Tensor]) -> Tensor:
        if not tensors:
            return torch.zeros((), dtype=torch.bool, device=restored.device)
        return torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any()

    return torch.stack([
        bad([restored]), bad([clean]), bad([r.restored for r in rows]), bad([r.clean for r in rows])
    ])


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).replace("torch.", "") if code < len(_DTYPES) else "another dtype"


def _check_headers(headers: list[dict[str, int]]) -> None:
    """The same error on every rank: computed from every rank's header alone."""
    zero = headers[0]

    def size(h: dict[str, int]) -> str:
        return f"{h['height']}x{h['image_width']}"

    for rank, h in enumerate(headers[1:], start=1):
        if h["layers"] != zero["layers"] or h["widths"] != zero["widths"]:
            what = (
                f"rows of {h['width']} features (images of {size(h)}) against rank 0's {zero['width']} (images of "
                f"{size(zero)})" if h["width"] != zero["width"] else "layers of other feature widths"
            )
            raise ValueError(
                f"torch.distributed: rank {rank} has {what}. At image and patch granularity the ranks gather each "
                "other's rows, which must have one width: give every rank images (or crops) of one size, or set "
                "pool_size so that the width does not depend on the image size"
            )
        if h["dtype"] != zero["dtype"]:
            raise ValueError(
                f"torch.distributed: rank {rank} has {_dtype_name(h['dtype'])} features against rank 0's "
                f"{_dtype_name(zero['dtype'])}: every rank must run the loss in one dtype (the same .to(dtype) and "
                "autocast settings)"
            )
    for rank, h in enumerate(headers):
        bad = [name for name in ("restored", "clean") if h[f"{name}_images"]]
        if bad:
            raise ValueError(
                f"torch.distributed: rank {rank}'s {' and '.join(bad)} images contain NaN or inf values (every rank "
                "raises this error, whatever check_inputs says: the ranks would otherwise disagree on the queue)"
            )
        bad = [name for name in ("restored", "clean") if h[f"{name}_features"]]
        if bad:
            raise ValueError(
                f"torch.distributed: the backbone's features of rank {rank}'s {' and '.join(bad)} images are not "
                "finite although the images are: the values overflow inside the backbone. Check input_range against "
                "that rank's images, and run the backbone in float32"
            )


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, sizes: list[int], rank: int, grad_scale: float) -> Tensor:  # type: ignore[override]
        ctx.offset, ctx.count, ctx.grad_scale = sum(sizes[:rank]), sizes[rank], grad_scale
        longest = max(sizes)
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Every rank computed the same loss from the same gathered rows, so the local
        # gradient of this rank's slice already is dL/dx_own: no communication needed.
        own = grad[ctx.offset : ctx.offset + ctx.count]
        return own * ctx.grad_scale if ctx.grad_scale != 1 else own, None, None, None


def gather_rows(rows: Tensor, sizes: list[int], *, grad_scale: float = 1.0) -> Tensor:
    """Concatenate the ``rows`` (n_r, ...) of all ranks in rank order.

    ``sizes`` holds every rank's row count (see :func:`gather_batch_sizes`). The
    gradient for this rank's rows is its slice of the incoming gradient times
    ``grad_scale``; rows from other ranks receive none.
    """
    world = distributed_world()
    if world is None:
        return rows
    rank, _ = world
    if rows.shape[0] != sizes[rank]:
        raise ValueError(f"gather_rows: this rank has {rows.shape[0]} rows but sizes says {sizes[rank]}")
    return _GatherRows.apply(rows, sizes, rank, float(grad_scale))


def gather_layer_rows(
    rows: list[LayerRows],
    ddp_gradient_scale: bool,
    image_size: tuple[int, int] = (0, 0),
    flags: Tensor | None = None,
) -> list[LayerRows]:
    """Every rank's rows of every layer, in rank order (unchanged without torch.distributed).
    One synchronisation for the headers of all ranks (:func:`exchange_headers`: batch sizes,
    widths, dtype, ``image_size`` and the non-finite ``flags``), which raises on every rank before
    any row travels when they disagree; the gradient of the own rows is scaled by the world size
    when ``ddp_gradient_scale`` (see the module's docstring)."""
    from .rows import LayerRows

    world = distributed_world()
    if world is None:
        return rows
    sizes = [h["batch"] for h in exchange_headers(rows, image_size, flags)]
    scale = world[1] if ddp_gradient_scale else 1.0
    return [
        LayerRows(
            r.layer, r.weight, gather_rows(r.restored, sizes, grad_scale=scale), gather_rows(r.clean, sizes), sum(sizes)
        )
        for r in rows
    ]

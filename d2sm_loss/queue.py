"""The memory queue of earlier batches' feature rows: :class:`FeatureQueue`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ._warnings import warn_user
from .ops.incremental import (
    Blocks,
    Journal,
    QueueSums,
    block_size,
    block_sums,
    combine_blocks,
    inverse_norms,
    pairwise_log_similarities,
    queue_statistic,
)

__all__ = ["FeatureQueue", "REFUSED_MESSAGE"]

#: The warning, given once per queue, for a batch that :meth:`FeatureQueue.push` refused.
REFUSED_MESSAGE = (
    "SemanticStatisticsLoss: a training batch with NaN or inf features was not pushed into the memory queue: "
    "the queue holds finite rows only, and later steps are those of a run without this batch. This call's loss "
    "is NaN; with check_inputs=True (the default) such images raise a ValueError instead. (Warned once.)"
)


#: The cache saved with the rows (``save=True``): log-similarities, inverse norms, block sums.
_CACHE = ("log_x", "log_y", "inverse_x", "inverse_y", "block_zx", "block_zy", "block_w")


class FeatureQueue(LazyModuleMixin, nn.Module):
    """A ring buffer of detached restored and clean feature rows of earlier batches, with
    the cached pairwise statistics that make the statistic over batch + queue incremental
    (:mod:`d2sm_loss.ops.incremental`): a call costs ``O(B (B + size) D)``, a push
    ``O(size (B + sqrt(size)))``. Memory: ``2 size D`` floats of rows plus about
    ``2 size^2`` of cache. The rows are allocated at the first training call (a lazy
    module), kept in float32 (float64 after ``.double()``), and only finite batches enter
    (:meth:`push`). With ``save=True`` ``state_dict()`` holds the rows and the cache, so a
    resume is bit-exact; loading checks both. Storage, cache, checkpoints and costs in
    detail: :doc:`/guides/queue`.

    Args:
        size: the capacity ``K`` in rows (earlier batches' samples).
            :class:`~d2sm_loss.SemanticStatisticsLoss` builds one queue per layer when its
            ``queue_size`` is positive.
        similarity: the similarity, ``"cosine"`` or ``"softmax"``, as in
            :func:`~d2sm_loss.functional.similarity_kl` (its ``similarity``).
        temperature: the softmax similarity's temperature (unused by ``"cosine"``).
        include_self: whether a row's distribution includes the row itself.
        save: whether ``state_dict()`` holds the rows and the cache.
    """

    restored: Tensor
    clean: Tensor
    filled: Tensor
    position: Tensor
    refused: Tensor
    log_x: Tensor
    log_y: Tensor
    inverse_x: Tensor
    inverse_y: Tensor
    log_zx: Tensor
    log_zy: Tensor
    w: Tensor
    block_zx: Tensor
    block_zy: Tensor
    block_w: Tensor

    def __init__(
        self,
        size: int,
        *,
        similarity: str = "cosine",
        temperature: float = 0.1,
        include_self: bool = True,
        save: bool = False,
    ) -> None:
        super().__init__()
        self.size, self.similarity, self.temperature = size, similarity, temperature
        self.include_self, self.save = include_self, save
        self.register_buffer("restored", torch.zeros(size, 0), persistent=False)
        self.register_buffer("clean", torch.zeros(size, 0), persistent=False)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("position", torch.zeros((), dtype=torch.long), persistent=False)
        #: How many batches :meth:`push` refused for NaN or inf values (not saved).
        self.register_buffer("refused", torch.zeros((), dtype=torch.long), persistent=False)
        self._warned_refused = False
        self._pending: tuple[Any, Tensor] | None = None  # CUDA: (event, host copy of refused)
        self._journal = Journal()
        self.block = block_size(size)
        self.blocks = -(-size // self.block)
        for name in ("log_x", "log_y"):  # columns padded to whole blocks (never filled)
            self.register_buffer(name, torch.zeros(size, self.blocks * self.block), persistent=False)
        for name in ("block_zx", "block_zy", "block_w"):
            self.register_buffer(name, torch.zeros(size, self.blocks), persistent=False)
        for name in ("inverse_x", "inverse_y", "log_zx", "log_zy", "w"):
            self.register_buffer(name, torch.zeros(size), persistent=False)

    # -- state ---------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many rows the queue holds (reading it synchronises with the device)."""
        return int(self.filled)

    @property
    def feature_size(self) -> int | None:
        """The width of the stored rows, None before the first push."""
        return self.restored.shape[1] or None

    def rows(self) -> tuple[Tensor, Tensor]:
        """The stored rows (restored, clean), in slot order (not the order of arrival)."""
        count = self.count
        return self.restored[:count], self.clean[:count]

    def check_feature_size(self, size: int, layer: str) -> None:
        if self.feature_size is not None and self.feature_size != size:
            raise ValueError(
                f"the memory queue of layer {layer!r} holds vectors of {self.feature_size} features, but "
                f"this batch gives {size}: the image or patch size changed. Keep it fixed, set pool_size "
                "so that the vector size does not depend on it, or call reset_queue()."
            )

    @torch.inference_mode(False)  # buffers stay ordinary tensors, usable for training, whatever the caller's mode
    def reset(self) -> None:
        """Empty the queue; the next training call sets the row width again."""
        self._allocate(0)
        self.filled.zero_()
        self.position.zero_()
        self._arm()
        self.rebuild()

    def _arm(self) -> None:
        """(Re-)install the lazy module's hooks: the next call allocates the rows."""
        if not hasattr(self, "_initialize_hook"):
            self._load_hook = self._register_load_state_dict_pre_hook(self._lazy_load_hook)
            self._initialize_hook = self.register_forward_pre_hook(self._infer_parameters, with_kwargs=True)

    def _disarm(self) -> None:
        if hasattr(self, "_initialize_hook"):
            self._initialize_hook.remove()
            self._load_hook.remove()
            del self._initialize_hook, self._load_hook

    def _allocate(self, width: int) -> None:
        self._journal = Journal()  # pending backward passes keep the old rows, which no push writes
        self.restored = torch.zeros(self.size, width, dtype=self.log_x.dtype, device=self.log_x.device)
        self.clean = torch.zeros_like(self.restored)

    def initialize_parameters(self, restored: Tensor, clean: Tensor, layer: str = "") -> None:  # type: ignore[override]
        """Lazy-module hook: allocate the rows for ``restored``'s width (first call)."""
        if self.feature_size is None:
            self._allocate(restored.shape[-1])

    def has_uninitialized_params(self) -> bool:  # type: ignore[override]
        return False

    # -- the cache -----------------------------------------------------------------------

    @torch.inference_mode(False)
    @torch.no_grad()
    def rebuild(self) -> None:
        """Recompute the cache from the stored rows: ``O(size^2 D)``."""
        valid = torch.arange(self.size, device=self.filled.device) < self.filled
        for name in ("log_x", "log_y", "inverse_x", "inverse_y"):
            getattr(self, name).zero_()
        if self.feature_size is not None:
            sides = ((self.restored, self.log_x, self.inverse_x), (self.clean, self.log_y, self.inverse_y))
            for rows, log, inverse in sides:
                pairs = pairwise_log_similarities(rows, self.similarity, self.temperature).masked_fill(~valid, 0.0)
                log[:, : self.size] = pairs
                inverse.copy_(inverse_norms(rows))
        rows = torch.arange(self.size, device=self.filled.device)
        self._refresh_sums(rows, torch.arange(self.blocks, device=rows.device), rows)

    def _refresh_sums(self, rows: Tensor, blocks: Tensor, all_rows: Tensor, ok: Tensor | None = None) -> None:
        """Recompute the block sums of ``all_rows`` over ``blocks`` and of ``rows`` over
        every block, then combine them; where ``ok`` (a 0-d bool tensor) is False, every
        sum keeps its old value."""
        every = torch.arange(self.blocks, device=blocks.device)
        args = (self.block, self.filled, self.include_self)
        for target, value in zip((self.block_zx, self.block_zy, self.block_w),
                                 block_sums(self.log_x, self.log_y, all_rows, blocks, *args)):
            value = value if ok is None else torch.where(ok, value, target.index_select(1, blocks))
            target.index_copy_(1, blocks, value)
        for target, value in zip((self.block_zx, self.block_zy, self.block_w),
                                 block_sums(self.log_x[rows], self.log_y[rows], rows, every, *args)):
            value = value if ok is None else torch.where(ok, value, target.index_select(0, rows))
            target.index_copy_(0, rows, value)
        self.log_zx, self.log_zy, self.w = combine_blocks(self.block_zx, self.block_zy, self.block_w)

    # -- a call and a push ----------------------------------------------------------------

    def forward(self, restored: Tensor, clean: Tensor, layer: str = "") -> tuple[Tensor, Tensor, Tensor, Blocks]:
        """The statistic of this call's rows (B, D) with the queue's: the batch rows' KL
        ``(B,)``, the queue rows' KL ``(size,)`` (0 for unfilled slots), the number of
        rows ``B + filled`` (a 0-d tensor) and the blocks that :meth:`push` reuses.
        Computed in float32 at least (float64 for float64 rows or queue). ``layer`` names
        the layer in the error for rows of another width than the stored ones."""
        self.check_feature_size(restored.shape[-1], layer)
        dtype = torch.promote_types(torch.promote_types(restored.dtype, self.restored.dtype), torch.float32)
        with torch.autocast(device_type=restored.device.type, enabled=False):
            kl_batch, kl_queue, blocks = queue_statistic(
                restored.to(dtype),
                clean.detach().to(dtype),
                self.restored.to(dtype),
                self.clean.to(dtype),
                self.inverse_x.to(dtype),
                self.inverse_y.to(dtype),
                self.filled,
                QueueSums(self.log_zx.to(dtype), self.log_zy.to(dtype), self.w.to(dtype)),
                similarity=self.similarity,
                temperature=self.temperature,
                include_self=self.include_self,
                journal=None if torch.compiler.is_compiling() else self._journal,
            )
        return kl_batch, kl_queue, self.filled + restored.shape[0], blocks

    @torch.no_grad()
    def push(self, restored: Tensor, clean: Tensor, blocks: Blocks, valid: Tensor | None = None) -> None:
        """Write this call's rows (the last ``size`` of them), overwriting the oldest once
        full, and update the cache from ``blocks`` (of the :meth:`forward` call on the
        same rows, before the push): ``O(B size)`` writes and ``O(size (B + 3 block))`` for
        the sums (under ``torch.compile`` also one copy of the rows).

        Only finite batches are pushed: a batch with a NaN or inf value in any row (or with
        ``valid``, a 0-d bool tensor, False: the loss passes whether its images were finite) leaves
        the queue (rows, counters and cache) exactly as it was, so later calls equal those
        of a run that never saw it. The test runs on the device (one pass over the batch,
        every write selects between the new and the old value), without a synchronisation;
        ``refused`` (a 0-d buffer) counts such batches, and the first one is warned about once (on
        the CPU at once, on CUDA at a later push, once an asynchronous copy of the count
        has arrived; not while ``torch.compile`` traces)."""
        ok = torch.isfinite(restored.detach()).all() & torch.isfinite(clean.detach()).all()
        ok = ok if valid is None else ok & valid

        def keep(new: Tensor, old: Tensor) -> Tensor:
            return torch.where(ok, new, old)

        n = min(restored.shape[0], self.size)
        dtype = self.restored.dtype
        restored, clean = restored.detach()[-n:].to(dtype), clean.detach()[-n:].to(dtype)
        index = (self.position + torch.arange(n, device=self.position.device)) % self.size
        old_x = self.restored[index]
        restored, clean = keep(restored, old_x), keep(clean, self.clean[index])
        # A pending backward must see the rows of its forward. In eager calls the rows are
        # written in place and the overwritten restored rows go to the journal; under
        # torch.compile every buffer the forward read is copied on write (the partitioner
        # may recompute from them in the backward).
        self.inverse_x = self.inverse_x.index_copy(0, index, keep(inverse_norms(restored), self.inverse_x[index]))
        inverse_y = keep(inverse_norms(clean), self.inverse_y[index])
        if torch.compiler.is_compiling():
            self.restored = self.restored.index_copy(0, index, restored)
            self.clean = self.clean.index_copy(0, index, clean)
            self.inverse_y = self.inverse_y.index_copy(0, index, inverse_y)
        else:
            self._journal = self._journal.record(index, old_x)
            self.restored.index_copy_(0, index, restored)
            self.clean.index_copy_(0, index, clean)
            self.inverse_y.index_copy_(0, index, inverse_y)
        for log, own, cross in ((self.log_x, blocks.xx, blocks.xq), (self.log_y, blocks.yy, blocks.yq)):
            # Rows of the written slots: new row vs every slot after the push (surviving
            # rows from the cross block, rewritten slots from the batch block).
            rows = keep(cross[-n:].to(dtype).index_copy(1, index, own[-n:, -n:].to(dtype)), log[index, : self.size])
            log.index_copy_(0, index, F.pad(rows, (0, log.shape[1] - self.size)))
            log.index_copy_(1, index, keep(rows.transpose(0, 1), log[:, index]))
        start = self.position // self.block
        written = n * ok.long()
        self.filled = torch.clamp(self.filled + written, max=self.size)
        self.position = (self.position + written) % self.size
        self.refused = self.refused + (~ok).long()
        # The written columns lie in at most n // block + 3 consecutive blocks (mod blocks).
        touched = min(self.blocks, n // self.block + 3)
        columns = (start + torch.arange(touched, device=start.device)) % self.blocks
        self._refresh_sums(index, columns, torch.arange(self.size, device=index.device), ok)
        self._report_refusals()

    def _report_refusals(self) -> None:
        """Warn once that a batch was refused, without waiting for the device (see :meth:`push`)."""
        if self._warned_refused or torch.compiler.is_compiling():
            return
        count: int | None = None
        if self.refused.device.type == "cpu":
            count = int(self.refused)
        elif self.refused.device.type == "cuda":
            if self._pending is not None and self._pending[0].query():
                count, self._pending = int(self._pending[1]), None
            if self._pending is None and not count:
                host = torch.empty((), dtype=torch.long, pin_memory=True)  # from torch's cached pinned pool
                host.copy_(self.refused, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._pending = (event, host)
        if count:
            self._warned_refused = True
            warn_user(REFUSED_MESSAGE)

    # -- moves and checkpoints -------------------------------------------------------------

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):  # type: ignore[override]
        """Moves follow the module; float rows stay float32 (float64 after ``.double()``).
        A change of dtype or device rebuilds the cache."""
        before, rows = (self.restored.dtype, self.restored.device), self.restored
        probe = fn(torch.zeros((), dtype=self.restored.dtype, device=self.restored.device))
        keep = probe.dtype in (torch.float32, torch.float64)
        for name, buffer in list(self._buffers.items()):
            if buffer is None:
                continue
            if buffer.is_floating_point() and not keep:
                self._buffers[name] = buffer.to(probe.device, torch.float32)
            else:
                self._buffers[name] = fn(buffer)
        if self.restored is not rows:
            self._journal = Journal()  # no push writes the rows a pending backward holds
        if (self.restored.dtype, self.restored.device) != before:
            self.rebuild()
        return self

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles: no pending CUDA event
        return {**self.__dict__, "_pending": None}

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        if self.save:
            restored, clean = self.rows()
            destination[prefix + "restored"] = restored if keep_vars else restored.detach()
            destination[prefix + "clean"] = clean if keep_vars else clean.detach()
            destination[prefix + "position"] = self.position.detach().clone()
            destination[prefix + "size"] = torch.tensor(self.size)  # tensors only: safetensors can save it
            for name in _CACHE:  # its exact state: a resume continues bit-identically
                value = getattr(self, name).detach()
                destination[prefix + name] = value[:, : self.size].clone() if name.startswith("log") else value.clone()

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        with torch.inference_mode(False):  # ordinary tensors, usable for training, whatever the caller's mode
            self._load_state(state_dict, prefix, strict, unexpected_keys)

    def _load_state(self, state_dict, prefix, strict, unexpected_keys) -> None:
        # "_extra_state" ({"size": size}) is how 0.1.0 saved the size.
        names = ("restored", "clean", "position", "size", "_extra_state", *_CACHE)
        saved = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
        extra = saved.get("_extra_state")
        size = int(saved["size"]) if "size" in saved else extra.get("size") if isinstance(extra, Mapping) else None
        if size is not None and size != self.size:
            raise ValueError(
                f"state_dict: the saved queue holds {size} rows, this loss's queue_size is {self.size}"
            )
        if strict:
            known = {prefix + name for name in names}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
        rows = saved.get("restored")
        if rows is None or rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
            self.reset()  # a checkpoint without queue rows: the queue starts empty
            return
        clean = saved.get("clean")
        if clean is None or clean.shape != rows.shape or rows.shape[0] > self.size:
            raise ValueError(
                f"state_dict: the queue at {prefix!r} has restored rows of shape {tuple(rows.shape)} and clean rows "
                f"of shape {None if clean is None else tuple(clean.shape)}; expected two equal shapes of at most "
                f"{self.size} rows"
            )
        if not (rows.is_floating_point() and clean.is_floating_point()):
            raise ValueError(f"state_dict: the queue at {prefix!r} has rows of dtype {rows.dtype}; expected floats")
        if not (torch.isfinite(rows).all() and torch.isfinite(clean).all()):
            raise ValueError(
                f"state_dict: the queue at {prefix!r} holds NaN or inf rows; a queue holds finite rows only. The file "
                "is damaged: load the checkpoint without the queue (drop the keys under this prefix)"
            )
        count = rows.shape[0]
        position = saved.get("position")
        if position is not None and (position.numel() != 1 or position.is_floating_point() or position.is_complex()):
            raise ValueError(f"state_dict: the queue's {prefix + 'position'!r} must be one integer, got {position!r}")
        self._disarm()
        self._allocate(rows.shape[1])
        with torch.no_grad():
            self.restored[:count] = rows.to(self.restored.dtype)
            self.clean[:count] = clean.to(self.clean.dtype)
            self.filled.fill_(count)
            self.position.fill_(int(position) % self.size if position is not None else count % self.size)
        self.rebuild()
        if rows.dtype == self.restored.dtype and all(name in saved for name in _CACHE):
            self._restore_cache(saved, prefix)

    @torch.no_grad()
    def _restore_cache(self, saved: Mapping[str, Tensor], prefix: str) -> None:
        """Take the saved cache in place of the one just rebuilt from the rows (which may
        differ in the last bits: the live cache is written from each call's blocks), after
        checking that it is the cache of these rows: shapes, dtypes, and values within
        rounding (log-similarities and log-sums compared as similarities and sums, since a
        logarithm near 0 is ill-conditioned; block sums through their combination)."""
        count = self.count
        tolerance = 1e-9 if self.restored.dtype == torch.float64 else 1e-3
        value: dict[str, Tensor] = {}
        for name in _CACHE:
            fresh = getattr(self, name)
            fresh = fresh[:, : self.size] if name.startswith("log") else fresh
            value[name] = saved[name]
            if value[name].shape != fresh.shape or value[name].dtype != fresh.dtype:
                raise ValueError(
                    f"state_dict: the queue's cache entry {prefix + name!r} has shape {tuple(value[name].shape)} and "
                    f"dtype {value[name].dtype}; expected {tuple(fresh.shape)} and {fresh.dtype}"
                )
            value[name] = value[name].to(fresh.device)
        sums = combine_blocks(value["block_zx"], value["block_zy"], value["block_w"])
        pairs = [(value[name][:count, :count].exp(), getattr(self, name)[:count, :count].exp(), name)
                 for name in ("log_x", "log_y")]
        pairs += [(value[name][:count], getattr(self, name)[:count], name) for name in ("inverse_x", "inverse_y")]
        pairs += [(sums.log_zx[:count].exp(), self.log_zx[:count].exp(), "block_zx"),
                  (sums.log_zy[:count].exp(), self.log_zy[:count].exp(), "block_zy"),
                  (sums.w[:count], self.w[:count], "block_w")]
        for got, want, name in pairs:
            close = (got == want) | ((got - want).abs() <= tolerance * (1 + want.abs()))
            if not bool(close.all()):
                raise ValueError(
                    f"state_dict: the queue's cache entry {prefix + name!r} does not match its saved rows: the file "
                    "is damaged or was edited. Load the checkpoint without the queue (drop the keys under this prefix)"
                )
        for name in _CACHE:
            target = getattr(self, name)
            (target[:, : self.size] if name.startswith("log") else target).copy_(value[name])
        self.log_zx, self.log_zy, self.w = combine_blocks(self.block_zx, self.block_zy, self.block_w)

    def extra_repr(self) -> str:
        return f"size={self.size}, filled={self.count}, feature_size={self.feature_size}, save={self.save}"

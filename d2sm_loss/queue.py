"""The memory queue of earlier batches' feature rows: :class:`FeatureQueue`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["FeatureQueue"]


class FeatureQueue(nn.Module):
    """A ring buffer of detached restored and clean feature vectors of earlier batches.

    Holds at most ``size`` rows of each. While it fills, its buffers grow with every push
    (their length is the fill count); once full they keep ``size`` rows and the write
    position (a 0-d long tensor) wraps around. Everything lives in tensors, so a compiled
    training step is not specialised on the fill count or position: ``torch.compile``
    re-traces only while the queue fills (the number of rows changes; with its automatic
    dynamic shapes, a few times at most) and never once it is full. Buffers and position are
    in the state dict, so a queue survives a save/load, also into a fresh loss.
    """

    restored: Tensor
    clean: Tensor
    position: Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("restored", torch.zeros(0, 0))
        self.register_buffer("clean", torch.zeros(0, 0))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    @property
    def count(self) -> int:
        """How many rows the queue holds."""
        return self.restored.shape[0]

    @property
    def feature_size(self) -> int | None:
        return self.restored.shape[1] if self.count else None

    def reset(self) -> None:
        self.restored = self.restored.new_zeros(0, 0)
        self.clean = self.clean.new_zeros(0, 0)
        self.position.zero_()

    def rows(self) -> tuple[Tensor, Tensor]:
        """The stored rows (restored, clean), in no particular order."""
        return self.restored, self.clean

    def check_feature_size(self, size: int, layer: str) -> None:
        if self.feature_size is not None and self.feature_size != size:
            raise ValueError(
                f"the memory queue of layer {layer!r} holds vectors of {self.feature_size} features, but "
                f"this batch gives {size}: the image or patch size changed. Keep it fixed, set pool_size "
                "so that the vector size does not depend on it, or call reset_queue()."
            )

    @torch.no_grad()
    def push(self, restored: Tensor, clean: Tensor) -> None:
        """Write the newest rows, overwriting the oldest once full."""
        # float32 rows (float64 after loss.double()), whatever the features' dtype.
        dtype = torch.float64 if self.restored.dtype == torch.float64 else torch.float32
        if self.restored.dtype != dtype:  # loss.half() or .bfloat16() cast the stored rows too
            self.restored, self.clean = self.restored.to(dtype), self.clean.to(dtype)
        restored = restored.detach()[-self.size :].to(dtype)
        clean = clean.detach()[-self.size :].to(dtype)
        count = self.count
        if count < self.size:
            room = self.size - count
            if count:
                self.restored = torch.cat([self.restored, restored[:room]])
                self.clean = torch.cat([self.clean, clean[:room]])
            else:
                self.restored, self.clean = restored[:room].clone(), clean[:room].clone()
            restored, clean = restored[room:], clean[room:]
            self.position.fill_(self.count % self.size)
        if restored.shape[0]:
            index = (self.position + torch.arange(restored.shape[0], device=self.position.device)) % self.size
            self.restored.index_copy_(0, index, restored)
            self.clean.index_copy_(0, index, clean)
            self.position.copy_((self.position + restored.shape[0]) % self.size)

    def get_extra_state(self) -> dict[str, int]:
        return {"size": self.size}

    def set_extra_state(self, state: dict[str, int]) -> None:
        pass  # checked in _load_from_state_dict, before any buffer changes

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, Mapping) and extra.get("size") != self.size:
            raise ValueError(
                f"state_dict: the saved queue holds {extra.get('size')} rows, this loss's queue_size is {self.size}"
            )
        # The buffers' shape is the fill count and feature size: take the saved one (in this
        # queue's dtype, which follows .double()).
        for name in ("restored", "clean"):
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, filled={self.count}, feature_size={self.feature_size}"

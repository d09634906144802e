"""Where a timm backbone's weights come from, in order, and what ``timm.create_model`` is told.

:func:`weight_source` decides, without building the model: the ``checkpoint`` argument; random
weights (``pretrained=False``, with a warning); a file on this machine (see
:func:`~d2sm_loss.weights.hub.candidates`); else a download, after one quick request that the hub
answers. :class:`WeightSource` carries the decision to ``timm.create_model``
(:meth:`WeightSource.timm_kwargs`) and turns a failed download into the error that says how to
pass weights without network (:meth:`WeightSource.loading`, :func:`download_hint`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .._warnings import warn_user
from . import hub
from .checkpoints import CheckpointError, CheckpointSource, check_complete, map_state_dict, read_checkpoint
from .packages import offline_alternatives

__all__ = ["WeightSource", "download_hint", "weight_source"]

#: Modules whose exceptions mean the network failed (the hub client's errors are not OSErrors everywhere).
_NETWORK_MODULES = ("huggingface_hub", "requests", "urllib3", "httpx", "httpx2", "urllib")


@dataclass(frozen=True)
class WeightSource:
    """What ``timm.create_model`` is given.

    Attributes:
        model_name: the model name (its pretrained tag may differ from the requested one when
            a stand-in was found offline).
        pretrained: whether timm loads weights.
        overlay: the pretrained configuration overlay (a state dict), or empty.
        description: where the weights came from, for users (``FeatureExtractor.weights_source``).
        download: timm downloads the weights.
        searched: where they were looked for on this machine (for the download error).
    """

    model_name: str
    pretrained: bool
    overlay: Mapping[str, Any]
    description: str
    download: bool = False
    searched: str = ""

    def timm_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``kwargs`` for ``timm.create_model(self.model_name, ...)``, with ``pretrained`` and the overlay."""
        kwargs = dict(kwargs, pretrained=self.pretrained)
        if self.overlay:
            kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), **self.overlay}
        return kwargs

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Around ``timm.create_model``: a failed download becomes the error of :func:`download_hint`;
        timm's log of the classifier keys a model cut before its head drops goes to the debug log."""
        with _quiet_head_keys():
            if not self.download:
                yield
                return
            try:
                yield
            except Exception as error:
                network = isinstance(error, (OSError, ConnectionError)) or (
                    type(error).__module__.split(".")[0] in _NETWORK_MODULES
                )
                if not network:
                    raise
                raise RuntimeError(download_hint(self.model_name, error, self.searched)) from None


def weight_source(
    name: str,
    blueprint: nn.Module,
    *,
    pretrained: bool,
    checkpoint: CheckpointSource | None = None,
    cache_dir: str | Path | None = None,
) -> WeightSource:
    """Where the weights of timm model ``name`` come from, in this order: the ``checkpoint``
    argument (mapped onto ``blueprint``, the model built on the meta device); random
    (``pretrained=False``, with a warning); a file on this machine (torch hub's checkpoint
    folder, the Hugging Face cache, see :func:`~d2sm_loss.weights.hub.candidates`); a download,
    after a quick check that the hub answers.

    Reads files but builds no model and downloads nothing.

    Raises:
        CheckpointError: a checkpoint, or a file found on this machine, does not fit the model.
        RuntimeError: the weights are neither here nor downloadable (the message says where
            they were looked for and how to pass a file).
    """
    if checkpoint is not None:
        label = str(checkpoint) if isinstance(checkpoint, Path) else "the checkpoint argument"
        return WeightSource(name, True, {"state_dict": map_state_dict(checkpoint, blueprint)}, label)
    if not pretrained:
        warn_user(
            f"SemanticStatisticsLoss: backbone {name!r} has random weights (pretrained=False), so the loss "
            "matches no semantic statistics: fine for tests; otherwise pass pretrained=True or checkpoint=PATH."
        )
        return WeightSource(name, False, {}, "random")
    cfg = getattr(blueprint, "pretrained_cfg", None) or {}
    if hub.names_local_source(cfg):
        return WeightSource(name, True, {}, "timm's pretrained_cfg")
    search = hub.candidates(name, cfg)
    for candidate in search:
        local = _load_candidate(candidate, blueprint, cache_dir, name)
        if local is not None:
            return local
    searched = hub.describe_search(search, cache_dir)
    blocker = hub.download_blocker(cfg)
    if blocker is not None:
        raise RuntimeError(download_hint(name, blocker, searched))
    where = cfg.get("hf_hub_id") or cfg.get("url") or "timm's default source"
    return WeightSource(name, True, {}, f"download of {where}", download=True, searched=searched)


def _load_candidate(
    candidate: hub.Candidate, blueprint: nn.Module, cache_dir: str | Path | None, name: str
) -> WeightSource | None:
    """A weight source for ``candidate`` if its file is on this machine (and, for a
    stand-in matched by position, fits the model), else None."""
    path = hub.locate(candidate, cache_dir)
    if path is None:
        return None
    way_out = (
        f" It was found in {candidate.place} by pretrained=True: delete it (pretrained=True then downloads "
        "it again) or pass checkpoint=PATH with a good file."
    )
    try:
        if candidate.by_position:
            try:
                overlay: dict[str, Any] = {"state_dict": map_state_dict(path, blueprint)}
            except CheckpointError as error:
                if candidate.exact or "does not fit" not in str(error):
                    raise
                return None  # a stand-in that does not fit this configuration of the model
        else:  # timm's own checkpoint filter converts it, as after a download of this file
            overlay = {"state_dict": read_checkpoint(path)}
            check_complete(overlay["state_dict"], blueprint, repr(str(path)))
    except CheckpointError as error:
        raise CheckpointError(f"{error}{way_out}") from None
    if not candidate.exact:  # stand-ins are torchvision's files (see hub.candidates)
        tagged = "." in candidate.model_name
        warn_user(
            f"backbone {name!r}: pretrained=True's weights are not on this machine; using torchvision's "
            + (f"({candidate.model_name!r}) " if tagged else "")
            + f"from {candidate.place}. To choose them (and silence this) pass "
            + (f"backbone={candidate.model_name!r} or " if tagged else "")
            + f"checkpoint={str(path)!r}."
        )
    return WeightSource(candidate.model_name, True, overlay, str(path))


def download_hint(name: str, error: BaseException, searched: str = "") -> str:
    """The error for weights that are neither on this machine nor downloadable: what failed, where
    they were looked for, a constructor line that works offline, and how to pass a file."""
    detail = str(error).splitlines()[0] if str(error) else "no network?"
    looked = f" Not found on this machine either: looked in {searched}." if searched else ""
    return (
        f"could not download pretrained weights for backbone {name!r} ({type(error).__name__}: {detail}).{looked} "
        f"{offline_alternatives()} Or pass a file: SemanticStatisticsLoss(backbone={name!r}, "
        "checkpoint='/path/to/file.pth') (timm's format, or a torchvision-style file whose tensors match by "
        "shape in order), or checkpoint='package:NAME' for a file an installed distribution ships "
        "(d2sm_loss.packaged_weights)."
    )


class _ClassifierKeysToDebug(logging.Filter):
    """timm's warning "Unexpected keys (... classifier.bias) found while loading pretrained weights"
    is expected when a classifier's checkpoint loads into a model cut before its head: it is
    logged once at debug level on this module's logger instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith("Unexpected keys ("):
            logging.getLogger(__name__).debug(
                "expected: the model is cut before the layers these keys belong to. timm: %s", record.getMessage()
            )
            return False
        return True


@contextlib.contextmanager
def _quiet_head_keys() -> Iterator[None]:
    """Within the block, timm's "Unexpected keys" warning goes to the debug log (see
    :class:`_ClassifierKeysToDebug`); every other timm message is unchanged."""
    logger = logging.getLogger("timm.models._builder")
    quiet = _ClassifierKeysToDebug()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)

"""Pretrained weights of a timm backbone: where they lie on this machine, and whether the hub
that serves them can be reached.

Machines without network keep ImageNet weights in two places, and both are read here without
opening a connection:

- torch hub's checkpoint folder, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``),
  where ``torch.hub.load_state_dict_from_url`` stores a file under the name it has at its URL:
  torchvision's files (``vgg19-dcbb9e9d.pth``, ``resnet50-0676ba61.pth``, ...) and timm's older
  release files;
- the Hugging Face cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), where
  timm's downloads from the hub (``timm/<model>.<tag>``) are kept.

:func:`candidates` lists, best first, the files that hold a backbone's weights: its own weights
(the file at its configuration's URL, torchvision's file they were converted from, its Hugging
Face files) and, for a model named without a pretrained tag, torchvision's ImageNet weights for
the same architecture. :func:`locate` finds one on disk. :func:`download_blocker` makes a single
request with a short timeout before timm's download starts, so that a machine without network
fails within seconds instead of spending a minute in the hub client's retries.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["Candidate", "candidates", "describe_search", "download_blocker", "locate", "names_local_source"]

#: Seconds to wait for the hub's answer before a download is given up as impossible.
PROBE_TIMEOUT_S = 5.0

HUB_FOLDER = "torch hub's checkpoint folder"
HF_CACHE = "the Hugging Face cache"

_TORCHVISION_URL = "https://download.pytorch.org/models/"
# Files read here as state dicts (torch.load or safetensors); others (e.g. .npz) are left to timm.
_READABLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors")

# torchvision's ImageNet files whose weights timm serves from the Hugging Face hub only (its
# configuration names no URL), keyed by the timm model they load into, by position. A key
# without a pretrained tag holds torchvision's own training, which no timm tag holds.
_TORCHVISION_FILES: dict[str, tuple[str, ...]] = {
    "vgg11.tv_in1k": ("vgg11-8a719046.pth",),
    "vgg11_bn.tv_in1k": ("vgg11_bn-6002323d.pth",),
    "vgg13.tv_in1k": ("vgg13-19584684.pth",),
    "vgg13_bn.tv_in1k": ("vgg13_bn-abd245e5.pth",),
    "vgg16.tv_in1k": ("vgg16-397923af.pth",),
    "vgg16_bn.tv_in1k": ("vgg16_bn-6c64b313.pth",),
    "vgg19.tv_in1k": ("vgg19-dcbb9e9d.pth",),
    "vgg19_bn.tv_in1k": ("vgg19_bn-c79401a0.pth",),
    "mobilenetv2_100": ("mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth"),
}

HfFiles = tuple[str, Union[str, None], tuple[str, ...]]  # (repository, revision, file names)


@dataclass(frozen=True)
class Candidate:
    """One place where a backbone's weights may lie.

    Attributes:
        model_name: the timm name (with its pretrained tag) whose weights the file holds.
        exact: the weights timm's ``pretrained=True`` would download for the requested name.
        by_position: a torchvision file that timm does not load by name: its tensors are
            mapped onto the model in order.
        file_name: a file in torch hub's checkpoint folder, or None.
        hf: ``(repository, revision, file names)`` in the Hugging Face cache, or None.
    """

    model_name: str
    exact: bool
    by_position: bool = False
    file_name: str | None = None
    hf: HfFiles | None = None

    @property
    def place(self) -> str:
        return HUB_FOLDER if self.file_name is not None else HF_CACHE


def names_local_source(cfg: Mapping[str, Any]) -> bool:
    """Whether a timm pretrained configuration already points at a local file, state dict or folder."""
    return bool(cfg.get("file")) or cfg.get("state_dict") is not None or cfg.get("source") == "local-dir"


def hub_folder(cache_dir: str | Path | None = None) -> Path:
    """torch hub's checkpoint folder, or the folder given to timm as ``cache_dir``."""
    return Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_folder(cache_dir: str | Path | None = None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    try:
        from huggingface_hub import constants
    except ImportError:
        return "(huggingface_hub is not installed)"
    return str(constants.HF_HUB_CACHE)


def _file_name(url: str | None) -> str | None:
    """The name torch.hub stores a download from ``url`` under."""
    if not url:
        return None
    return url.rsplit("/", 1)[-1].split("?", 1)[0] or None


def _hf_files(cfg: Mapping[str, Any]) -> HfFiles | None:
    """The Hugging Face repository and the files timm reads from it, in timm's order of preference."""
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    repo, _, revision = str(hub_id).partition("@")
    filename = cfg.get("hf_hub_filename")
    if not filename or filename == "pytorch_model.bin":
        names: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    elif filename == "open_clip_pytorch_model.bin":
        names = ("open_clip_model.safetensors", filename)
    else:
        names = (str(filename),)
    return repo, revision or None, names


def _registry_cfg(model_name: str) -> Mapping[str, Any]:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    return cfg.to_dict() if cfg is not None else {}


def candidates(name: str, cfg: Mapping[str, Any]) -> list[Candidate]:
    """Where the weights of timm model ``name`` (pretrained configuration ``cfg``) may lie, best first.

    First the weights ``pretrained=True`` downloads: the file at the configuration's URL and
    torchvision's file they were converted from (torch hub's folder), then the Hugging Face
    files. Then, when ``name`` carries no pretrained tag, torchvision's ImageNet weights for the
    same architecture: another tag's torchvision file, or a torchvision training no tag holds.
    """
    import timm
    from timm.models import split_model_name_tag

    architecture, tag = split_model_name_tag(name)
    own = f"{architecture}.{cfg['tag']}" if cfg.get("tag") else name
    found: list[Candidate] = []
    url_file = _file_name(cfg.get("url"))
    if url_file and url_file.endswith(_READABLE_SUFFIXES):
        found.append(Candidate(own, exact=True, file_name=url_file))
    found += [Candidate(own, exact=True, by_position=True, file_name=f) for f in _TORCHVISION_FILES.get(own, ())]
    hf = _hf_files(cfg)
    if hf is not None:
        found.append(Candidate(own, exact=True, hf=hf))
    if tag:  # weights chosen by name: nothing stands in for them
        return found
    for other in timm.list_pretrained(f"{architecture}.*"):
        if other == own:
            continue
        url = str(_registry_cfg(other).get("url") or "")
        if url.startswith(_TORCHVISION_URL):
            found.append(Candidate(other, exact=False, file_name=_file_name(url)))
        found += [
            Candidate(other, exact=False, by_position=True, file_name=f) for f in _TORCHVISION_FILES.get(other, ())
        ]
    found += [
        Candidate(architecture, exact=False, by_position=True, file_name=f)
        for f in _TORCHVISION_FILES.get(architecture, ())
    ]
    return found


def locate(candidate: Candidate, cache_dir: str | Path | None = None) -> Path | None:
    """The candidate's file on this machine, or None. Reads the file system only."""
    if candidate.file_name is not None:
        path = hub_folder(cache_dir) / candidate.file_name
        return path if path.is_file() else None
    if candidate.hf is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, revision, names = candidate.hf
    for filename in names:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):  # else None, or the marker of a file known not to exist
            return Path(found)
    return None


def describe_search(found: list[Candidate], cache_dir: str | Path | None = None) -> str:
    """Where :func:`locate` looked, for an error message."""
    files = [c.file_name for c in found if c.file_name is not None]
    repos = [c.hf[0] for c in found if c.hf is not None]
    places = []
    if files:
        places.append(f"{HUB_FOLDER} {str(hub_folder(cache_dir))!r} for {', '.join(files)}")
    if repos:
        places.append(f"{HF_CACHE} {hf_cache_folder(cache_dir)!r} for {', '.join(repos)}")
    return " and ".join(places) if places else "no local place (the model's configuration names no file)"


def _hf_http_error() -> type[BaseException]:
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    return HfHubHTTPError


def download_blocker(cfg: Mapping[str, Any], timeout: float = PROBE_TIMEOUT_S) -> BaseException | None:
    """Why timm cannot download the weights of ``cfg`` now, or None when the hub answers.

    One request (a HEAD of the first file timm reads), no retries, at most ``timeout``
    seconds. Any HTTP answer, even "not found", means the hub is reachable and timm's own
    download (with its retries) goes ahead. ``HF_HUB_OFFLINE=1`` blocks Hugging Face
    downloads at once.
    """
    hf = _hf_files(cfg)
    try:
        import huggingface_hub
    except ImportError:
        huggingface_hub = None  # type: ignore[assignment]
    if hf is not None and huggingface_hub is not None:  # timm downloads from the Hugging Face hub
        repo, revision, names = hf
        try:
            file_url = huggingface_hub.hf_hub_url(repo, names[0], revision=revision)
            huggingface_hub.get_hf_file_metadata(file_url, timeout=timeout)
        except _hf_http_error():
            return None
        except Exception as error:  # connection, timeout, proxy or offline-mode errors
            return error
        return None
    url = cfg.get("url")
    if url:  # timm downloads through torch.hub
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            return None
        except (OSError, ValueError) as error:
            return error
    return None

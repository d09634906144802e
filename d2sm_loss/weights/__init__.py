"""Backbone weights: where they come from, reading them, mapping them onto a model.

Weights come from a checkpoint (``checkpoint=PATH``, ``checkpoint="package:NAME"`` for the file an
installed distribution ships, or a state dict; timm's own format or a torchvision-style file
whose tensors match by shape in order, see :func:`map_state_dict`), from timm's pretrained
weights (``pretrained=True``), or are random (``pretrained=False``, with a warning).

``pretrained=True`` reads no network when the weights are already on the machine. In order:

1. the backbone's own weights in torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``,
   by default ``~/.cache/torch/hub/checkpoints``), under the file name of the URL in timm's
   pretrained configuration or of the torchvision file they were converted from (e.g.
   ``vgg19-dcbb9e9d.pth`` for ``vgg19``);
2. the same weights in the Hugging Face cache (``$HF_HUB_CACHE``), where timm's downloads
   from the hub are kept;
3. for a name without a pretrained tag (``"resnet50"``, not ``"resnet50.a1_in1k"``),
   torchvision's ImageNet weights of the same architecture in torch hub's folder (e.g.
   ``resnet50-0676ba61.pth``, ``mobilenet_v2-b0353104.pth``), with a warning that names them;
4. a download. One request with a 5 s timeout checks first that the hub answers, so a
   machine without network gets the error (which says how to pass weights) within seconds
   rather than after the hub client's retries; ``HF_HUB_OFFLINE=1`` skips the request.

:attr:`FeatureExtractor.weights_source <d2sm_loss.FeatureExtractor>` says which was used.

The modules: ``source`` (that order, and the download error), ``hub`` (torch hub's folder,
the Hugging Face cache, whether the hub answers), ``packages`` (weights that installed
distributions ship), ``checkpoints`` (reading, mapping, checking and saving state dicts).
"""

from .checkpoints import (
    CheckpointError,
    CheckpointSource,
    check_complete,
    checked_checkpoint,
    load_checkpoint,
    load_state_dicts,
    map_state_dict,
    read_checkpoint,
    save_state_dicts,
)
from .packages import PACKAGE_PREFIX, WEIGHT_PACKAGES, installed_weight_packages, packaged_weights
from .source import WeightSource, weight_source

__all__ = [
    "PACKAGE_PREFIX",
    "CheckpointError",
    "CheckpointSource",
    "WEIGHT_PACKAGES",
    "WeightSource",
    "check_complete",
    "checked_checkpoint",
    "installed_weight_packages",
    "load_checkpoint",
    "load_state_dicts",
    "map_state_dict",
    "packaged_weights",
    "read_checkpoint",
    "save_state_dicts",
    "weight_source",
]

"""d2sm-loss: the Deep Semantic Statistics Matching (D2SM) loss for image restoration.

    >>> from d2sm_loss import SemanticStatisticsLoss
    >>> criterion = SemanticStatisticsLoss(backbone="vgg19", pretrained=True)
    >>> loss = l1(restored, clean) + weight * criterion(restored, clean)
"""

from . import functional
from .backbones import FeatureExtractor, load_weights, packaged_weights
from .environment import collect_environment
from .functional import similarity_kl
from .loss import SemanticStatisticsLoss

__version__ = "0.1.0"

__all__ = [
    "SemanticStatisticsLoss",
    "FeatureExtractor",
    "collect_environment",
    "functional",
    "load_weights",
    "packaged_weights",
    "similarity_kl",
    "__version__",
]

"""d2sm-loss: the Deep Semantic Statistics Matching (D2SM) loss for image restoration.

    >>> from d2sm_loss import SemanticStatisticsLoss
    >>> criterion = SemanticStatisticsLoss(backbone="vgg19", pretrained=True)
    >>> loss = l1(restored, clean) + weight * criterion(restored, clean)
"""

from . import functional
from .backbones import FeatureExtractor, load_weights, packaged_weights
from .environment import collect_environment
from .functional import similarity_kl
from .loss import LayerRows, SemanticStatisticsLoss
from .weighting import gradient_norms, gradient_ratio, suggest_weight

__version__ = "0.2.0"

__all__ = [
    "SemanticStatisticsLoss",
    "FeatureExtractor",
    "LayerRows",
    "collect_environment",
    "functional",
    "gradient_norms",
    "gradient_ratio",
    "load_weights",
    "packaged_weights",
    "similarity_kl",
    "suggest_weight",
    "__version__",
]

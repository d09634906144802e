"""d2sm-loss: the Deep Semantic Statistics Matching (D2SM) loss for image restoration.

The loss (:class:`SemanticStatisticsLoss`, restored images first) and the statistic on any
feature sets (:func:`similarity_kl`):

>>> import torch
>>> from d2sm_loss import similarity_kl
>>> clean = torch.randn(100, 64, dtype=torch.float64)
>>> float(similarity_kl(clean, clean)) == 0.0     # equal similarity structures
True
>>> float(similarity_kl(clean + 0.5 * torch.randn_like(clean), clean)) > 0
True
"""

from . import functional
from .features import FeatureExtractor
from .functional import similarity_kl
from .loss import SemanticStatisticsLoss
from .queue import FeatureQueue
from .rows import LayerRows
from .weighting import gradient_norms, gradient_ratio, suggest_weight
from .weights import CheckpointError, load_checkpoint, packaged_weights

__version__ = "0.2.0"

__all__ = [
    "SemanticStatisticsLoss",
    "FeatureExtractor",
    "CheckpointError",
    "FeatureQueue",
    "LayerRows",
    "functional",
    "gradient_norms",
    "gradient_ratio",
    "load_checkpoint",
    "packaged_weights",
    "similarity_kl",
    "suggest_weight",
    "__version__",
]

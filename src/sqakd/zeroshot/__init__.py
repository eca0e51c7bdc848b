"""Zero-shot (data-free) quantization: a generator of images from the teacher alone, and the
losses that train it (batch-norm statistics matching, GDFQ's and AdaDFQ's terms)."""

from .bns import BatchNormStatistics, batchnorm_layers
from .generator import ConditionalGenerator
from .grid import class_grid
from .losses import (
    agreement_loss,
    disagreement_loss,
    entropy,
    margin_loss,
    normalised_entropy,
    softened_difference_entropy,
)

__all__ = [
    "BatchNormStatistics",
    "ConditionalGenerator",
    "agreement_loss",
    "batchnorm_layers",
    "class_grid",
    "disagreement_loss",
    "entropy",
    "margin_loss",
    "normalised_entropy",
    "softened_difference_entropy",
]

"""What the student learns from: distillation losses and feature taps.

Logit losses (registered by name) are called as ``loss(student_logits, teacher_logits)``; feature
losses as ``loss(student_features, teacher_features)`` on dicts ``{tap name: [B, C, H, W]}``.
"""

from .adapters import FeatureAdapters
from .affinity import (
    FastFeatureAffinity,
    FeatureAffinity,
    fast_feature_affinity_loss,
    feature_affinity_loss,
    gaussian_projection,
)
from .attention import (
    RefinedFeatureDistillation,
    channel_attention,
    softened_kl,
    spatial_attention,
)
from .kl import KLDistillation, LogitMSE, kd_kl_divergence
from .registry import available_losses, build_loss, register_loss
from .taps import FeatureTaps

__all__ = [
    "FeatureTaps",
    "FastFeatureAffinity",
    "FeatureAdapters",
    "FeatureAffinity",
    "KLDistillation",
    "LogitMSE",
    "RefinedFeatureDistillation",
    "available_losses",
    "build_loss",
    "channel_attention",
    "fast_feature_affinity_loss",
    "feature_affinity_loss",
    "gaussian_projection",
    "kd_kl_divergence",
    "register_loss",
    "softened_kl",
    "spatial_attention",
]

"""What the student learns from: distillation losses and feature taps.

Logit losses (registered by name) are called as ``loss(student_logits, teacher_logits)``; feature
losses as ``loss(student_features, teacher_features)`` on dicts ``{tap name: [B, C, H, W]}``. The
distillation zoo (AT, NST, SP, RKD, CC, FitNet, VID, CRD, FSP, FT, KD) has its own registry
(``register_feature_loss``, ``feature_registry.py``), apart from the logit losses, so that a
logit-loss option (SQAKD's ``extra_loss``) never gets a feature loss.
"""

from . import attention, contrastive, factor, fsp, hints, nst, relational, vid  # noqa: F401
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
from .feature_registry import (
    READS,
    BuildContext,
    FeatureLoss,
    available_feature_losses,
    build_feature_loss,
    feature_loss_class,
    register_feature_loss,
)
from .kl import KLDistillation, LogitMSE, kd_kl_divergence
from .registry import available_losses, build_loss, register_loss
from .taps import FeatureTaps

__all__ = [
    "READS",
    "BuildContext",
    "FeatureLoss",
    "available_feature_losses",
    "build_feature_loss",
    "feature_loss_class",
    "register_feature_loss",
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

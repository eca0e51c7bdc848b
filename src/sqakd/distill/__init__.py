"""What the student learns from: distillation losses, registered by name, and feature taps."""

from .kl import KLDistillation, LogitMSE, kd_kl_divergence
from .registry import available_losses, build_loss, register_loss
from .taps import FeatureTaps

__all__ = [
    "FeatureTaps",
    "KLDistillation",
    "LogitMSE",
    "available_losses",
    "build_loss",
    "kd_kl_divergence",
    "register_loss",
]

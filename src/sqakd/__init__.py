"""sqakd: label-free quantization-aware training by self-supervised knowledge distillation."""

from . import distill, models, quant  # noqa: F401  (sqakd.models.build_model, ...)
from .quant import QuantPolicy, available_quantizers, calibrate, describe, plan, prepare

__version__ = "0.1.0"

__all__ = [
    "QuantPolicy",
    "distill",
    "models",
    "quant",
    "available_quantizers",
    "calibrate",
    "describe",
    "plan",
    "prepare",
]

"""sqakd: label-free quantization-aware training by self-supervised knowledge distillation."""

from .quant import QuantPolicy, available_quantizers, calibrate, describe, plan, prepare

__version__ = "0.1.0"

__all__ = ["QuantPolicy", "available_quantizers", "calibrate", "describe", "plan", "prepare"]

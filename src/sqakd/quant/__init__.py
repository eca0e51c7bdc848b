"""How numbers become low-bit: quantizers, quantized layers, model preparation, calibration."""

from . import methods  # noqa: F401  (registers every quantizer)
from .attention import AttentionProjection, QuantMultiheadAttention
from .base import QuantGrid, Quantizer, check_bits
from .calibrate import calibrate, reset_calibration
from .layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantizedLayer,
    QuantLinear,
    model_parameters,
    quantized_layers,
    quantizer_parameters,
    quantizers,
    set_compiled_kernels,
    set_quantization,
    uses_compiled_kernels,
)
from .policy import LayerOverride, QuantPolicy
from .prepare import QuantPlan, describe, plan, prepare
from .registry import available_quantizers, build_quantizer, register_quantizer

__all__ = [
    "AttentionProjection",
    "LayerOverride",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantEmbedding",
    "QuantGrid",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantPlan",
    "QuantPolicy",
    "Quantizer",
    "QuantizedLayer",
    "available_quantizers",
    "build_quantizer",
    "calibrate",
    "check_bits",
    "describe",
    "model_parameters",
    "plan",
    "prepare",
    "quantized_layers",
    "quantizer_parameters",
    "quantizers",
    "register_quantizer",
    "reset_calibration",
    "set_compiled_kernels",
    "set_quantization",
    "uses_compiled_kernels",
]

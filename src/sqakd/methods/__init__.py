"""How a run is organised: each method is a short recipe registered by name."""

from . import sqakd  # noqa: F401  (registers sqakd, qat, supervised)
from .base import Method, StepOutput, available_methods, build_method, method_class, register_method

__all__ = [
    "Method",
    "StepOutput",
    "available_methods",
    "build_method",
    "method_class",
    "register_method",
]

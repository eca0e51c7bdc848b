"""The optional export dependencies (onnx, onnxruntime), imported with the fix in the error."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install "sqakd[export]" (or: pip install onnxruntime onnx)'


def require(module: str) -> ModuleType:
    """Import ``module`` or raise a one-line ``ImportError`` that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed; {INSTALL_HINT}") from None

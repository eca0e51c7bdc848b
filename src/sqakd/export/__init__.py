"""Deployment: ONNX export with integer weights, a parity check against ONNX Runtime, and packed
low-bit weight files.

    report = export_onnx(model, "model.onnx", input_shape=(1, 3, 32, 32))
    check = verify_onnx("model.onnx", model, images, labels)      # check.passed
    size = save_packed(model, "model.packed.safetensors")         # load_packed(model2, path)

``onnx``/``onnxruntime`` are optional (``pip install "sqakd[export]"``); packing needs neither.
"""

from .onnx_export import ExportReport, export_onnx, read_layer_metadata
from .packing import SizeReport, load_packed, pack_bits, packed_size, save_packed, unpack_bits
from .verify import VerifyReport, verify_onnx
from .view import LayerExport, build_export_view

__all__ = [
    "ExportReport",
    "LayerExport",
    "SizeReport",
    "VerifyReport",
    "build_export_view",
    "export_onnx",
    "load_packed",
    "pack_bits",
    "packed_size",
    "read_layer_metadata",
    "save_packed",
    "unpack_bits",
    "verify_onnx",
]

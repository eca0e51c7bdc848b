"""ONNX Runtime latency on the CPU of a float32 model (ResNet-20 or MobileNetV2, CIFAR size) vs
its QDQ exports (W8A8, W4A4), plain and reshaped for integer kernels (``integer_kernels=True``),
with the ONNX file sizes, the packed (bit-packed safetensors) sizes and how many quantized layers
ONNX Runtime turned into integer kernels (``QLinearConv`` in its optimised graph).

ONNX Runtime runs with all graph optimisations (ORT_ENABLE_ALL), so that QuantizeLinear /
DequantizeLinear pairs are fused into integer kernels wherever ORT's QDQ patterns match. The
latency is the median of ``--repeats`` runs after warm-up, in milliseconds per batch. Weights are
random (latency does not depend on their values); quantizers are calibrated on one random batch.

Run: python benchmarks/export_latency.py [--model resnet20] [--methods ewgs lsq] [--first-last float]
     python benchmarks/export_latency.py --files runs/a/model.onnx runs/b/model.onnx  (exported
     files as they are, e.g. trained runs' exports; 32x32 input named "input")
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from _timing import machine

from sqakd.export import export_onnx, packed_size
from sqakd.models import build_model
from sqakd.quant import QuantPolicy, calibrate, prepare

BATCHES = (1, 64)


def float_onnx(model: torch.nn.Module, path: Path) -> None:
    """The float model through the same exporter settings as export_onnx (batch norm folded)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 3, 32, 32),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    path.write_bytes(buffer.getvalue())


def latency_ms(path: Path, batch: int, repeats: int) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input": torch.randn(batch, 3, 32, 32).numpy()}
    for _ in range(max(3, repeats // 10)):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]


def integer_layers(path: Path) -> int:
    """How many ``QLinearConv`` / ``QLinearMatMul`` / ``QGemm`` nodes ORT's optimised graph has."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    optimised = path.with_suffix(".optimised.onnx")
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kinds = {"QLinearConv", "QLinearMatMul", "QGemm"}
    return sum(node.op_type in kinds for node in onnx.load(str(optimised)).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "mobilenetv2"])
    parser.add_argument("--methods", nargs="*", default=["ewgs", "lsq"])
    parser.add_argument("--first-last", default="float", choices=["float", "8bit", "same"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--files", nargs="*", type=Path, default=None)
    args = parser.parse_args()
    if args.files:
        time_files(args.files, args.repeats)
        return
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10).eval()
    calibration = torch.randn(64, 3, 32, 32)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        float_path = Path(folder) / "float.onnx"
        float_onnx(model, float_path)
        float_bytes = sum(
            4 * t.numel() for t in model.state_dict().values() if t.is_floating_point()
        )
        rows.append(("float32", "-", float_path, float_bytes, "-"))
        for method in args.methods:
            for bits in (8, 4):
                policy = QuantPolicy(
                    method=method, weight_bits=bits, act_bits=bits, first_last=args.first_last
                )
                student = prepare(model, policy)
                calibrate(student, [calibration])
                packed = packed_size(student).packed_bytes
                for integer in (False, True):
                    path = Path(folder) / f"{method}-w{bits}a{bits}-{integer}.onnx"
                    report = export_onnx(student, path, (1, 3, 32, 32), integer_kernels=integer)
                    label = f"W{bits}A{bits} QDQ (opset {report.opset})" + (
                        ", integer kernels" if integer else ""
                    )
                    count = f"{integer_layers(path)} of {len(report.layers)}"
                    rows.append((label, method, path, packed, count))
        print(
            f"{args.model} (CIFAR, 32x32), ONNX Runtime {ort.__version__} CPUExecutionProvider, "
            f"ORT_ENABLE_ALL; first/last layers: {args.first_last}; {os.cpu_count()} CPU cores; "
            f"{machine()}\n"
        )
        print(
            "| model | method | integer layers | ONNX file | packed weights file | "
            + " | ".join(f"batch {b} (ms)" for b in BATCHES)
            + " |"
        )
        print("|---|---|---|---|---|" + "---|" * len(BATCHES))
        float_times = None
        for label, method, path, stored, count in rows:
            times = [latency_ms(path, b, args.repeats) for b in BATCHES]
            float_times = float_times or times
            cells = [f"{t:.2f} ({t / f:.2f}x float)" for t, f in zip(times, float_times)]
            size = path.stat().st_size
            print(
                f"| {label} | {method} | {count} | {size / 1024:.0f} KiB | {stored / 1024:.0f} KiB | "
                + " | ".join(cells)
                + " |"
            )


def time_files(paths: list[Path], repeats: int) -> None:
    print(f"ONNX Runtime {ort.__version__} CPUExecutionProvider, ORT_ENABLE_ALL; {machine()}\n")
    print("| file | ONNX file | " + " | ".join(f"batch {b} (ms)" for b in BATCHES) + " |")
    print("|---|---|" + "---|" * len(BATCHES))
    for path in paths:
        times = " | ".join(f"{latency_ms(path, b, repeats):.2f}" for b in BATCHES)
        print(f"| {path} | {path.stat().st_size / 1024:.0f} KiB | {times} |")


if __name__ == "__main__":
    main()

"""Check an exported ONNX model against the fake-quantized PyTorch model it came from.

Both run on the same images (ONNX Runtime on the CPU, PyTorch in eval mode). The report gives
the rate at which their predictions (argmax) agree, the largest logit difference, and top-1 of
both when labels are given.

Exact equality is not expected: the two compute the same integer grid with differently ordered
float arithmetic, so a value lying within a rounding error of a quantization threshold can land
on the neighbouring level, and that one-step difference moves later values across other
thresholds. How far such flips spread depends on the model (they stay local in a trained
network, they can multiply through an untrained deep one), so ``per_layer=True`` checks each
quantized layer *in isolation*: the layer's part of the ONNX graph (extracted from the layer's
input to its output tensor, named in the export metadata) is run on exactly the input PyTorch's
layer received, and the report gives, per layer, the largest output difference and the fraction
of outputs that differ by more than float noise (1e-4 of the layer's largest output). A wrong
scale, zero point, clip or weight shows there at once, whatever the model's condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..quant import quantized_layers
from ..quant.deployed import check_calibrated
from ._optional import require
from .onnx_export import read_layer_metadata

CHUNK = 256  # images per run when a single tensor is given
NOISE = 1e-4  # a layer output differs "beyond float noise" by more than this x its largest value


@dataclass
class VerifyReport:
    """ONNX Runtime vs PyTorch on the same images."""

    samples: int
    agreement: float
    max_abs_diff: float
    threshold: float
    torch_top1: float | None = None
    onnx_top1: float | None = None
    #: quantized layer name -> largest |ONNX - PyTorch| of its output, the layer run in isolation
    #: on PyTorch's input to it (per_layer=True)
    per_layer: dict[str, float] | None = None
    #: quantized layer name -> fraction of its outputs differing by more than float noise
    per_layer_mismatch: dict[str, float] | None = None
    #: predictions compared (one per image for classification; per token or per pixel for
    #: logits with more axes than (N, classes)); 0 = one per image
    predictions: int = 0

    @property
    def passed(self) -> bool:
        return self.agreement >= self.threshold

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        counted = f"{self.samples} images"
        if self.predictions and self.predictions != self.samples:
            counted = f"{self.predictions} predictions in {self.samples} images"
        lines = [
            f"{verdict}: predictions agree on {self.agreement:.2%} of {counted} "
            f"(threshold {self.threshold:.2%}); largest logit difference {self.max_abs_diff:.3g}"
        ]
        if self.torch_top1 is not None and self.onnx_top1 is not None:
            lines.append(f"top-1: PyTorch {self.torch_top1:.2%}, ONNX Runtime {self.onnx_top1:.2%}")
        if self.per_layer:
            width = max(len(name) for name in self.per_layer)
            mismatch = self.per_layer_mismatch or {}
            lines.append(
                "each quantized layer in isolation: largest difference, outputs that differ"
            )
            lines += [
                f"  {name.ljust(width)}  {diff:.3g}  {mismatch.get(name, 0.0):.3%}"
                for name, diff in self.per_layer.items()
            ]
        return "\n".join(lines)


def verify_onnx(
    onnx_path: str | Path,
    model: nn.Module,
    images: Tensor | Iterable[Tensor | tuple[Tensor, Tensor]],
    labels: Tensor | None = None,
    threshold: float = 0.99,
    per_layer: bool = False,
    class_dim: int = 1,
) -> VerifyReport:
    """Run ``onnx_path`` in ONNX Runtime (CPU, all graph optimisations) and ``model`` in PyTorch
    (eval mode) on ``images`` and compare them.

    Args:
        images: an (N, C, H, W) tensor, or an iterable of batches (tensors, or
            ``(images, labels)`` pairs as a data loader gives them).
        labels: (N,) class indices for a tensor of images (pairs bring their own labels).
        threshold: the agreement rate (0..1] needed for ``report.passed``.
        per_layer: also compare each quantized layer in isolation (see the module docstring).
        class_dim: the logits' class axis (1 for (N, C) and (N, C, H, W) segmentation logits,
            -1 for (N, T, V) sequence logits); agreement and top-1 are counted per prediction
            (per image, per pixel, per token), labels then shaped like the predictions.
    """
    ort = require("onnxruntime")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ValueError(f"ONNX file {onnx_path} not found; write it with export_onnx first")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    for name, layer in quantized_layers(model):
        if layer.quantizes:
            check_calibrated(name, layer)
    session = _session(ort, str(onnx_path))
    input_name = session.get_inputs()[0].name
    layer_sessions = _layer_sessions(ort, onnx_path) if per_layer else {}
    collector = _LayerCollector(model, list(layer_sessions))
    totals = _Totals(list(layer_sessions))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch, batch_labels in _batches(images, labels):
                batch = batch.contiguous()
                if batch.is_floating_point():
                    batch = batch.float()
                onnx_logits = session.run(None, {input_name: batch.cpu().numpy()})[0]
                torch_logits = model(batch).cpu().numpy()
                totals.add(torch_logits, onnx_logits, batch_labels, class_dim)
                for name, (layer_input, layer_output) in collector.take().items():
                    layer_session = layer_sessions[name]
                    feed = {layer_session.get_inputs()[0].name: layer_input.numpy()}
                    totals.add_layer(name, layer_output.numpy(), layer_session.run(None, feed)[0])
    finally:
        collector.remove()
        model.train(was_training)
    return totals.report(threshold, per_layer)


def _batches(
    images: Tensor | Iterable[Tensor | tuple[Tensor, Tensor]], labels: Tensor | None
) -> Iterator[tuple[Tensor, Tensor | None]]:
    if isinstance(images, Tensor):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        for start in range(0, len(images), CHUNK):
            end = start + CHUNK
            yield images[start:end], None if labels is None else labels[start:end]
        return
    if labels is not None:
        raise ValueError("give labels with a tensor of images; batches bring their own labels")
    for batch in images:
        if isinstance(batch, (tuple, list)):
            yield batch[0], batch[1] if len(batch) > 1 else None
        else:
            yield batch, None


def _session(ort, model: str | bytes):  # type: ignore[no-untyped-def]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _layer_sessions(ort, onnx_path: Path) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Quantized layer name -> a session running only that layer's part of the graph."""
    onnx = require("onnx")
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path))))
    sessions = {}
    for record in read_layer_metadata(onnx_path):
        if record.get("input") and record.get("output"):
            part = extractor.extract_model([str(record["input"])], [str(record["output"])])
            sessions[str(record["name"])] = _session(ort, part.SerializeToString())
    return sessions


class _LayerCollector:
    """Forward hooks that keep each named quantized layer's input and output of the batch."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, tuple[Tensor, Tensor]] = {}
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(
                f"the ONNX file names layers the model lacks ({', '.join(missing[:3])}); "
                f"verify against the model it was exported from"
            )
        self.handles = [modules[name].register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach()  # token ids stay integers
            self.outputs[name] = (
                (x.float() if x.is_floating_point() else x).contiguous(),
                output.detach(),
            )

        return hook

    def take(self) -> dict[str, tuple[Tensor, Tensor]]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Totals:
    def __init__(self, layer_names: list[str]) -> None:
        self.samples = self.agreeing = self.predictions = 0
        self.max_abs_diff = 0.0
        self.correct_torch = self.correct_onnx = self.labelled = 0
        self.layer_diff = dict.fromkeys(layer_names, 0.0)
        self.layer_mismatch = dict.fromkeys(layer_names, 0)
        self.layer_size = dict.fromkeys(layer_names, 0)

    def add(
        self,
        torch_logits: np.ndarray,
        onnx_logits: np.ndarray,
        labels: Tensor | None,
        class_dim: int = 1,
    ) -> None:
        if torch_logits.shape != onnx_logits.shape:
            raise ValueError(
                f"ONNX output shape {onnx_logits.shape} differs from the model's "
                f"{torch_logits.shape}; verify against the model it was exported from"
            )
        if not -torch_logits.ndim <= class_dim < torch_logits.ndim or torch_logits.ndim < 2:
            raise ValueError(
                f"class_dim {class_dim} is not an axis of the logits of shape "
                f"{torch_logits.shape}; use 1 for (N, C, ...) or -1 for (N, T, V)"
            )
        torch_pred = torch_logits.argmax(axis=class_dim)
        onnx_pred = onnx_logits.argmax(axis=class_dim)
        self.samples += len(torch_pred)
        self.predictions += torch_pred.size
        self.agreeing += int((torch_pred == onnx_pred).sum())
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(torch_logits - onnx_logits).max()))
        if labels is not None:
            target = labels.cpu().numpy().reshape(torch_pred.shape)
            self.labelled += target.size
            self.correct_torch += int((torch_pred == target).sum())
            self.correct_onnx += int((onnx_pred == target).sum())

    def add_layer(self, name: str, torch_output: np.ndarray, onnx_output: np.ndarray) -> None:
        diff = np.abs(torch_output - onnx_output)
        noise = NOISE * float(np.abs(torch_output).max())
        self.layer_diff[name] = max(self.layer_diff[name], float(diff.max()))
        self.layer_mismatch[name] += int((diff > noise).sum())
        self.layer_size[name] += diff.size

    def report(self, threshold: float, per_layer: bool) -> VerifyReport:
        if self.samples == 0:
            raise ValueError("verification got no images; give at least one batch")
        labelled = self.labelled == self.predictions
        return VerifyReport(
            samples=self.samples,
            predictions=self.predictions,
            agreement=self.agreeing / self.predictions,
            max_abs_diff=self.max_abs_diff,
            threshold=threshold,
            torch_top1=self.correct_torch / self.predictions if labelled else None,
            onnx_top1=self.correct_onnx / self.predictions if labelled else None,
            per_layer=dict(self.layer_diff) if per_layer else None,
            per_layer_mismatch={
                name: self.layer_mismatch[name] / max(self.layer_size[name], 1)
                for name in self.layer_diff
            }
            if per_layer
            else None,
        )

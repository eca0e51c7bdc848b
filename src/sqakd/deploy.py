"""``sqakd export`` and ``sqakd verify`` on a run folder.

run folder (config.yaml + model.safetensors) -> the quantized network, loaded without executing
code -> ``model.onnx`` (QDQ, :func:`sqakd.export.export_onnx`) and ``model.packed.safetensors``
(:func:`sqakd.export.save_packed`) -> ONNX Runtime against PyTorch on the test images
(:func:`sqakd.export.verify_onnx`).

The ONNX model takes images normalised as in training: ``(pixel / 255 - mean) / std`` per
channel; the mean and std are written into the report and the ONNX metadata.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .config import Config
from .export import (
    ExportReport,
    SizeReport,
    VerifyReport,
    export_onnx,
    save_packed,
    verify_onnx,
)
from .pipeline import evaluation_loader, load_trained_model
from .quant import quantized_layers

ONNX_NAME, PACKED_NAME = "model.onnx", "model.packed.safetensors"


@dataclass
class ExportResult:
    """The files :func:`export_run` wrote and what it measured."""

    onnx: ExportReport
    packed_path: Path | None
    size: SizeReport | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __str__(self) -> str:
        lines = [str(self.onnx)]
        lines.append(
            f"input: normalised images, (pixel / 255 - mean) / std with mean {_round(self.mean)} "
            f"and std {_round(self.std)}"
        )
        if self.size is not None:
            lines.append(f"packed weights {self.packed_path}: {self.size}")
        return "\n".join(lines)


def _round(values: tuple[float, ...]) -> list[float]:
    return [round(v, 4) for v in values]


def require_quantized(model: nn.Module, weights: Path | None) -> None:
    """A clear error for a float model: export and verify need a quantized run's weights."""
    if not any(layer.quantizes for _, layer in quantized_layers(model)):
        raise ValueError(
            f"the weights {weights or ''} hold a float model; export a quantized run's "
            "model.safetensors (make one with `sqakd quantize`)"
        )


def export_run(
    config: Config,
    weights: Path | None,
    output: Path,
    packed: bool = True,
    opset: int = 17,
    fold_batchnorm: bool = True,
    integer_kernels: bool = False,
    key_map: Mapping[str, str] | None = None,
) -> ExportResult:
    """Write ``output`` (ONNX QDQ) and, with ``packed``, the packed weights beside it;
    ``integer_kernels`` as in :func:`sqakd.export.export_onnx`; ``key_map`` renames the
    weights' keys (see :func:`sqakd.pipeline.load_trained_model`)."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"the ONNX output must end in .onnx, got {output}")
    if not output.parent.is_dir():
        raise ValueError(f"output folder {output.parent} does not exist; create it first")
    model, bundle, _ = load_trained_model(
        config.model_copy(update={"run": _on_cpu(config)}), weights, key_map
    )
    require_quantized(model, weights)
    height, width = bundle.image_size
    report = export_onnx(
        model,
        output,
        input_shape=(1, bundle.in_channels, height, width),
        opset=opset,
        fold_batchnorm=fold_batchnorm,
        integer_kernels=integer_kernels,
    )
    _add_normalisation(output, bundle.mean, bundle.std)
    packed_path = size = None
    if packed:
        packed_path = output.with_name(output.stem + ".packed.safetensors")
        size = save_packed(model, packed_path)
    return ExportResult(report, packed_path, size, tuple(bundle.mean), tuple(bundle.std))


def _on_cpu(config: Config):  # type: ignore[no-untyped-def]
    """Export and ONNX Runtime work on the CPU whatever device the run trained on."""
    return config.run.model_copy(update={"device": "cpu"})


def _add_normalisation(path: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "sqakd.normalisation", json.dumps({"mean": mean, "std": std})
    onnx.save(proto, str(path))


def verify_run(
    config: Config,
    weights: Path | None,
    onnx_path: Path,
    threshold: float = 0.99,
    per_layer: bool = False,
    limit: int | None = None,
    class_dim: int | None = None,
    key_map: Mapping[str, str] | None = None,
) -> VerifyReport:
    """ONNX Runtime against the fake-quantized PyTorch model on the run's test images;
    predictions along ``class_dim`` (default: the run's ``method.class_dim``, else 1);
    ``key_map`` renames the weights' keys (see :func:`sqakd.pipeline.load_trained_model`)."""
    if not Path(onnx_path).is_file():
        raise ValueError(f"ONNX file {onnx_path} not found; write it with `sqakd export` first")
    model, bundle, device = load_trained_model(
        config.model_copy(update={"run": _on_cpu(config)}), weights, key_map
    )
    require_quantized(model, weights)
    if limit is not None and bundle.test is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        bundle = dataclasses.replace(
            bundle, test=bundle.test.subset(range(min(limit, len(bundle.test))))
        )
    loader = evaluation_loader(bundle, config, device)
    if class_dim is None:
        class_dim = int(getattr(config.method, "class_dim", None) or 1)
    return verify_onnx(
        onnx_path, model, loader, threshold=threshold, per_layer=per_layer, class_dim=class_dim
    )

"""Export a calibrated fake-quantized model to ONNX with integer weights (QDQ format).

The graph is the export view (:mod:`sqakd.export.view`) traced by torch's TorchScript ONNX
exporter: each quantized layer becomes ``DequantizeLinear(integer codes)`` for its weight and
``QuantizeLinear -> DequantizeLinear`` for its input, the rest of the model stays float. The batch
axis is dynamic. Quantized layers take the integer-sums form where their grids allow it, and a
prepared model's batch norms are ``Mul``/``Add`` (see :mod:`sqakd.export.view`), so that the
graph computes what PyTorch computes in eval mode. ``BatchNormalization`` nodes (plain
``nn.BatchNorm2d``, or every batch norm with ``integer_kernels``) are folded into the convolutions
that precede them only where that keeps parity: into float convolutions; after a quantized
convolution they stay, because folding would change the weight the integer codes describe.

Each layer's true bit-widths, methods and container types go into the model's
``metadata_props`` under ``sqakd.layers`` (JSON), so that a 4-bit layer stored in an int8
container is still known as 4-bit.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..quant.float64_sums import Float64SumConvExport
from ._optional import require
from .batchnorm import fold_batchnorm as fold_batchnorm_pass
from .integer_graph import prepare_integer_kernels
from .view import LayerExport, build_export_view

#: the TorchScript exporter writes opsets up to 20; int16 QuantizeLinear/DequantizeLinear need 21
TRACE_MAX_OPSET = 20
INT16_MIN_OPSET = 21
MIN_OPSET = 13  # per-axis DequantizeLinear
INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_KEY = "sqakd.layers"


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: per-layer decisions, the opset and the file size."""

    path: Path
    opset: int
    file_bytes: int
    input_shape: tuple[int, ...]
    layers: list[LayerExport]
    notes: list[str] = field(default_factory=list)

    @property
    def float_fallbacks(self) -> list[str]:
        """Names of the layers with a weight or input left in float."""
        return [layer.name for layer in self.layers if layer.float_fallback]

    def __str__(self) -> str:
        header = ("layer", "W/A bits", "weight", "input", "notes")
        rows = [header] + [
            (
                layer.name,
                f"{_bits(layer.weight_bits)}/{_bits(layer.act_bits)}",
                layer.weight_export,
                layer.act_export,
                "; ".join(layer.notes),
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{self.path}: {self.file_bytes:,} bytes, opset {self.opset}")
        lines.extend(self.notes)
        return "\n".join(lines)


def _bits(bits: int) -> str:
    return "f" if bits >= 32 else str(bits)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    opset: int = 17,
    fold_batchnorm: bool = True,
    integer_kernels: bool = False,
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
) -> ExportReport:
    """Write ``model`` (prepared and calibrated) to ``path`` as an ONNX QDQ model.

    Args:
        model: a model from :func:`sqakd.quant.prepare`, calibrated (the model is not changed).
        path: the ``.onnx`` file to write; its folder must exist.
        input_shape: the shape of one float input batch, e.g. ``(1, 3, 32, 32)``; the batch
            axis is exported as dynamic. Give this or ``example_inputs``.
        example_inputs: what the model is called with, a tensor or a tuple of tensors of any
            dtype (token ids as ``torch.long``, several inputs): traced as given, each input's
            batch axis dynamic (ONNX inputs ``input``, ``input_1``, ...).
        opset: ONNX opset (13 or higher). Raised to 21 when a layer needs int16 codes (8-bit
            weights with a half-integer zero point, e.g. EWGS W8), and said so in the report.
        fold_batchnorm: fold batch norm into the float convolutions before it.
        integer_kernels: reshape the graph so that ONNX Runtime runs the quantized layers as
            integer kernels (``QLinearConv``): see :mod:`sqakd.export.integer_graph`. Batch norm
            after a quantized layer is then folded into its weight scales, and that layer is
            left out of the per-layer check of :func:`sqakd.export.verify_onnx`.
    """
    onnx = require("onnx")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output folder {path.parent} does not exist; create it first")
    examples = _examples(input_shape, example_inputs)
    input_shape = tuple(examples[0].shape)
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"opset must be {MIN_OPSET}..{onnx.defs.onnx_opset_version()}, got {opset!r}"
        )
    view, layers = build_export_view(model, integer_sums=not integer_kernels)
    notes = [
        f"{name}: float convolution summed in float64 (im2col, MatMul in double, Cast), as "
        f"PyTorch's inference does"
        for name, module in view.named_modules()
        if isinstance(module, Float64SumConvExport)
    ]
    target_opset = opset
    int16_layers = [layer.name for layer in layers if layer.weight_container == "int16"]
    if int16_layers and opset < INT16_MIN_OPSET:
        target_opset = INT16_MIN_OPSET
        notes.append(
            f"opset raised from {opset} to {INT16_MIN_OPSET}: int16 weight codes in "
            f"{', '.join(int16_layers)}"
        )
    proto = _trace(view, examples, min(target_opset, TRACE_MAX_OPSET))
    _inline_initializer_copies(proto)
    containers = _containers(view)
    folded = None
    if fold_batchnorm:
        quantized = tuple(_scope(layer.name, containers) for layer in layers)
        folded = fold_batchnorm_pass(proto, quantized)
    if target_opset > TRACE_MAX_OPSET:
        _raise_opset(proto, target_opset)
    scopes = {layer.name: _scope(layer.name, containers) if layer.name else "/" for layer in layers}
    _find_layer_outputs(proto, layers, scopes)
    if integer_kernels:
        notes.append(prepare_integer_kernels(proto, layers, scopes).note())
    notes.append(_batchnorm_note(proto, folded))
    fallbacks = [layer.name for layer in layers if layer.float_fallback]
    if fallbacks:
        notes.append(f"float fallback (see the notes column) in: {', '.join(fallbacks)}")
    _write_metadata(proto, layers, input_shape)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return ExportReport(path, target_opset, path.stat().st_size, input_shape, layers, notes)


def _check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else ()
    if len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"input_shape must be the shape of one batch as positive whole numbers, e.g. "
            f"(1, 3, 32, 32); got {input_shape!r}"
        )
    return shape


def _examples(
    input_shape: tuple[int, ...] | None, example_inputs: Tensor | tuple[Tensor, ...] | None
) -> tuple[Tensor, ...]:
    """The example inputs to trace with: ``example_inputs`` as a tuple, or zeros of
    ``input_shape``."""
    if example_inputs is None:
        if input_shape is None:
            raise ValueError(
                "give input_shape (e.g. (1, 3, 32, 32)) or example_inputs (what the model is "
                "called with, e.g. a batch of token ids)"
            )
        return (torch.zeros(_check_input_shape(input_shape)),)
    examples = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not examples or not all(isinstance(e, Tensor) and e.dim() >= 1 for e in examples):
        raise ValueError(
            "example_inputs must be a tensor or a tuple of tensors, each with a batch axis; got "
            f"{type(example_inputs).__name__}"
        )
    return tuple(examples)


def input_names(count: int) -> list[str]:
    """The ONNX graph's input names: ``input``, then ``input_1``, ``input_2``, ..."""
    return [INPUT_NAME] + [f"{INPUT_NAME}_{i}" for i in range(1, count)]


class _ModuleStack:
    """Forward pre/post hooks that keep the names of the modules being run, so that a failed
    trace can name the layer it failed in."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.failed: str | None = None
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module, args):  # type: ignore[no-untyped-def]
            self.stack.append(f"{name or '(the model)'} ({type(module).__name__})")

        return hook

    def _leave(self, module, args, output) -> None:  # type: ignore[no-untyped-def]
        self.stack.pop()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _trace(view: nn.Module, examples: tuple[Tensor, ...], opset: int):
    onnx = require("onnx")
    names = input_names(len(examples))
    stack = _ModuleStack(view)
    # PRESERVE on an eval-mode model: inference graph without the exporter's own Conv+BN fusion,
    # which would also fold into quantized layers whose weight is a float constant
    mode = torch.onnx.TrainingMode.PRESERVE
    buffer = io.BytesIO()
    fastpath = _mha_fastpath(False)  # the fused attention kernel has no ONNX form
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                view,
                examples,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_axes={**{n: {0: "batch"} for n in names}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
                training=mode,
            )
    except Exception as error:  # noqa: BLE001 - one line naming the layer
        where = stack.stack[-1] if stack.stack else _layer_of_op(view, str(error))
        raise ValueError(
            f"the model cannot be traced for ONNX export: in layer {where}: "
            f"{type(error).__name__}: {_first_line(error)}; give example_inputs the model "
            f"accepts, or make that layer's forward traceable"
        ) from error
    finally:
        stack.remove()
        _mha_fastpath(fastpath)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "sqakd"
    return proto


def _mha_fastpath(enabled: bool) -> bool:
    """Switch ``nn.MultiheadAttention``'s fused inference kernel on or off; returns the old
    setting."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None:
        return True
    previous = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(enabled)
    return previous


def _layer_of_op(model: nn.Module, message: str) -> str:
    """The layers whose type the failed ``aten::`` op is named after (the exporter fails after
    tracing, outside every module), else the op itself."""
    op = next((w for w in message.replace("'", " ").split() if w.startswith("aten::")), "")
    flat = op.removeprefix("aten::").replace("_", "").lower()
    names = [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if name and flat and type(module).__name__.lower() in flat
    ]
    return ", ".join(names[:3]) if names else (op or "(no layer recorded)")


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:300]


def _inline_initializer_copies(proto) -> None:  # type: ignore[no-untyped-def]
    """The exporter stores equal initializers once and feeds the others through ``Identity``
    nodes; point their readers at the initializer itself so every DequantizeLinear reads its
    codes, scale and zero point directly."""
    initializers = {init.name for init in proto.graph.initializer}
    outputs = {output.name for output in proto.graph.output}
    copies = {
        node.output[0]: node.input[0]
        for node in proto.graph.node
        if node.op_type == "Identity"
        and node.input[0] in initializers
        and node.output[0] not in outputs
    }
    if not copies:
        return
    kept = [
        node
        for node in proto.graph.node
        if node.output[0] not in copies or node.op_type != "Identity"
    ]
    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = copies.get(name, name)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def _raise_opset(proto, opset: int) -> None:  # type: ignore[no-untyped-def]
    """Opset 21 changed no op the export view emits except by adding types (int4, int16 in
    QuantizeLinear/DequantizeLinear, ...), so the opset-20 graph is valid as it stands."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset


def _scope(name: str, containers: frozenset[str] = frozenset()) -> str:
    """The TorchScript exporter's node-name prefix of module ``name``: one path element per
    ancestor, each its qualified name from its last non-numeric part on (``features.17.conv.1.0``
    -> ``/features/features.17/conv/conv.1/conv.1.0/``). The ancestors named in ``containers``
    (a ``ModuleList`` or ``ModuleDict``: iterated or indexed, never called) have no element:
    ``encoder.layers.0.linear1`` -> ``/encoder/layers.0/linear1/``."""
    parts = name.split(".")
    elements = []
    for end in range(1, len(parts) + 1):
        atoms = parts[:end]
        if ".".join(atoms) in containers:
            continue
        start = max((i for i, atom in enumerate(atoms) if not atom.isnumeric()), default=0)
        elements.append(".".join(atoms[start:]))
    return "/" + "/".join(elements) + "/"


def _containers(model: nn.Module) -> frozenset[str]:
    """The qualified names of ``model``'s modules without a forward of their own
    (``ModuleList``, ``ModuleDict``): never called, they open no scope."""
    return frozenset(
        name for name, m in model.named_modules() if type(m).forward is nn.Module.forward
    )


def _find_layer_outputs(proto, layers: list[LayerExport], scopes: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """Each layer's output is the output of the last node inside its module scope (``scopes``:
    layer name -> node-name prefix); its input is the one tensor its nodes read that neither
    they nor an initializer produce."""
    constants = {init.name for init in proto.graph.initializer}
    for layer in layers:
        prefix = scopes[layer.name]
        inside = [node for node in proto.graph.node if node.name.startswith(prefix)]
        if not inside:
            continue
        layer.output = inside[-1].output[0]
        made = {name for node in inside for name in node.output} | constants
        outer = list(dict.fromkeys(n for node in inside for n in node.input if n and n not in made))
        if len(outer) == 1:
            layer.input = _shared_input(proto, layers, scopes, layer, outer[0])


def _shared_input(
    proto, layers: list[LayerExport], scopes: dict[str, str], layer: LayerExport, tensor: str
) -> str:  # type: ignore[no-untyped-def]
    """The input of ``layer`` given the one outside tensor its nodes read. Layers that read one
    input with equal quantizer constants (an attention's query, key and value projections)
    share their first nodes once the exporter has merged equal subgraphs, so ``tensor`` may be
    made inside an earlier layer's scope without being its output: the layer's input is then
    that earlier layer's (what PyTorch hands both)."""
    producer = next((node for node in proto.graph.node if tensor in node.output), None)
    if producer is None:
        return tensor
    for other in layers:
        prefix = scopes[other.name]
        if other is not layer and other.input and producer.name.startswith(prefix):
            return tensor if tensor == other.output else other.input
    return tensor


def _batchnorm_note(proto, folded: int | None) -> str:  # type: ignore[no-untyped-def]
    kept = sum(node.op_type == "BatchNormalization" for node in proto.graph.node)
    if folded is None:
        return f"batch norm not folded ({kept} BatchNormalization nodes)"
    if folded + kept == 0:
        return (
            "batch norm: no BatchNormalization node (a prepared model's are Mul/Add, as in PyTorch)"
        )
    return (
        f"batch norm: {folded} of {folded + kept} folded into float convolutions; {kept} kept "
        f"(after quantized layers, where folding would change the quantized weights)"
    )


def _write_metadata(proto, layers: list[LayerExport], input_shape: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    entries = {
        METADATA_KEY: json.dumps([layer.as_dict() for layer in layers]),
        "sqakd.input_shape": json.dumps(list(input_shape)),
        "sqakd.format": "qdq",
    }
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value


def read_layer_metadata(onnx_path: str | Path) -> list[dict[str, object]]:
    """The per-layer records :func:`export_onnx` stored in the file's ``metadata_props``."""
    onnx = require("onnx")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{onnx_path} has no {METADATA_KEY} metadata; export it with sqakd.export")

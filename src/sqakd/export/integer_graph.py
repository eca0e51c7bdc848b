"""ONNX graph pass: reshape a QDQ export so that ONNX Runtime runs integer kernels.

ONNX Runtime replaces ``DequantizeLinear -> Conv -> QuantizeLinear`` (input, weight and bias each
from a ``DequantizeLinear``, the output quantized) by one ``QLinearConv``, and drops a ``Relu``
between the convolution and a ``QuantizeLinear`` whose zero point is the type's lowest value.
The plain export (:mod:`sqakd.export.onnx_export`) never matches: each quantized layer clips its
input in float before quantizing it, a batch norm sits between the convolution and the next
layer's quantizer, and the bias is float. Per quantized layer this pass

1. **moves the clip onto the codes**: ``Clip(x) -> QuantizeLinear -> DequantizeLinear`` becomes
   ``QuantizeLinear -> Clip(codes) -> DequantizeLinear``. The clip bounds are grid levels, so the
   codes are the same. A ReLU6 (``Clip(0, 6)``) in front is dropped when the code clip already
   implies it (zero point 0, highest kept level at most 6);
2. **folds the batch norm after the layer into the weight scales**: ``BN(conv(x, s (q - z)))`` is
   ``conv(x, s f (q - z)) + (b - mean) f + beta`` with ``f = gamma / sqrt(var + eps)`` per output
   channel, so the integer codes stay as they are and only the (now per-channel) scale changes.
   Only where every ``f > 0`` (a scale must be positive); the same arithmetic up to float
   rounding;
3. **quantizes the bias** to int32 codes with scale ``input scale x weight scale`` (what the
   integer kernel adds to its int32 accumulator): a change of at most half an accumulator step.

A layer whose output then reaches the next quantized layer's ``QuantizeLinear`` (directly or
through a ``Relu``) runs as ``QLinearConv`` in ONNX Runtime. A layer whose output feeds anything
else (a residual ``Add``, pooling, the graph output) keeps a float output, and ONNX Runtime runs
it as a float convolution: its output has no grid to be requantized to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .view import LayerExport

INT32 = (np.iinfo(np.int32).min, np.iinfo(np.int32).max)


@dataclass
class IntegerPassReport:
    """What :func:`prepare_integer_kernels` changed."""

    clips_moved: list[str] = field(default_factory=list)
    batchnorms_folded: list[str] = field(default_factory=list)
    biases_quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def note(self) -> str:
        text = (
            f"integer kernels: clip moved onto the codes in {len(self.clips_moved)} layers, "
            f"batch norm folded into the weight scales of {len(self.batchnorms_folded)}, "
            f"int32 bias in {len(self.biases_quantized)}"
        )
        if self.skipped:
            text += "; left as they were: " + ", ".join(
                f"{name} ({why})" for name, why in self.skipped.items()
            )
        return text


class _Graph:
    """Lookups over an ONNX graph that the pass edits in place."""

    def __init__(self, proto) -> None:  # type: ignore[no-untyped-def]
        self.graph = proto.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.outputs = {output.name for output in self.graph.output}

    def producer(self, name: str):  # type: ignore[no-untyped-def]
        return next((node for node in self.graph.node if name in node.output), None)

    def readers(self, name: str) -> list:  # type: ignore[type-arg]
        return [node for node in self.graph.node if name in node.input]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a ``Constant`` node's output, else ``None``."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer(name)
        if node is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if value is None else numpy_helper.to_array(value)
        return None

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        unique, index = name, 0
        while unique in self.initializers:
            index += 1
            unique = f"{name}_{index}"
        init = numpy_helper.from_array(array, unique)
        self.graph.initializer.append(init)
        self.initializers[unique] = init
        return unique

    def single_reader(self, name: str) -> bool:
        return len(self.readers(name)) == 1 and name not in self.outputs


def prepare_integer_kernels(
    proto, layers: list[LayerExport], scopes: dict[str, str]
) -> IntegerPassReport:  # type: ignore[no-untyped-def]
    """Apply the pass (module docstring) to ``proto`` in place, for each layer in ``layers``
    (``scopes``: layer name -> its node-name prefix). Layers whose BN was folded get an empty
    ``output`` (their ONNX output is no longer the PyTorch layer's output)."""
    graph = _Graph(proto)
    report = IntegerPassReport()
    for layer in layers:
        prefix = scopes[layer.name]
        op = next(
            (
                node
                for node in graph.graph.node
                if node.name.startswith(prefix) and node.op_type in ("Conv", "Gemm")
            ),
            None,
        )
        if op is None or not layer.weight_container:
            report.skipped[layer.name] = "no integer weight"
            continue
        if _move_clip(graph, op):
            report.clips_moved.append(layer.name)
        if op.op_type == "Conv" and _fold_batchnorm(graph, op):
            report.batchnorms_folded.append(layer.name)
            layer.output = ""
            layer.notes.append("batch norm folded into the weight scales")
        if _quantize_bias(graph, op):
            report.biases_quantized.append(layer.name)
    _drop_unread_nodes(graph.graph)
    _sort_topologically(graph.graph)
    from .batchnorm import _drop_unused_initializers

    _drop_unused_initializers(graph.graph)
    return report


def _weight_dequantize(graph: _Graph, op):  # type: ignore[no-untyped-def]
    node = graph.producer(op.input[1])
    if node is None or node.op_type != "DequantizeLinear":
        return None
    if not all(name in graph.initializers for name in node.input):
        return None
    return node


def _input_dequantize(graph: _Graph, op):  # type: ignore[no-untyped-def]
    node = graph.producer(op.input[0])
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
        return None
    return node


def _move_clip(graph: _Graph, op) -> bool:  # type: ignore[no-untyped-def]
    """``Clip -> QuantizeLinear -> DequantizeLinear -> op`` to ``QuantizeLinear -> Clip(codes) ->
    DequantizeLinear -> op``."""
    dequantize = _input_dequantize(graph, op)
    quantize = graph.producer(dequantize.input[0]) if dequantize is not None else None
    if quantize is None or quantize.op_type != "QuantizeLinear" or len(quantize.input) < 3:
        return False
    clip = graph.producer(quantize.input[0])
    if clip is None or clip.op_type != "Clip" or not graph.single_reader(clip.output[0]):
        return False
    if not graph.single_reader(quantize.output[0]):
        return False
    low, high = (graph.constant(name) for name in clip.input[1:3])
    scale, zero = (graph.constant(name) for name in quantize.input[1:3])
    if low is None or high is None or scale is None or zero is None:
        return False
    bounds = [
        np.round(np.asarray(v, np.float64) / scale + zero.astype(np.float64)) for v in (low, high)
    ]
    info = np.iinfo(zero.dtype)
    code_low, code_high = (np.asarray(np.clip(b, info.min, info.max), zero.dtype) for b in bounds)
    low_name = graph.add_initializer(code_low, clip.name.strip("/") + "_code_min")
    high_name = graph.add_initializer(code_high, clip.name.strip("/") + "_code_max")
    codes = quantize.output[0]
    quantize.input[0] = _skip_implied_clip(graph, clip.input[0], scale, zero, code_high)
    del clip.input[:]
    clip.input.extend([codes, low_name, high_name])
    clip.output[0] = codes + "/clipped"
    dequantize.input[0] = clip.output[0]
    return True


def _skip_implied_clip(graph: _Graph, name: str, scale, zero, code_high) -> str:  # type: ignore[no-untyped-def]
    """``name``, or the input of the ``Clip(0, H)`` (ReLU6) that produces it when clipping the
    codes makes it redundant: the zero point is the type's lowest code (``QuantizeLinear``
    saturates below 0 there) and ``H`` quantizes to at least the highest kept code."""
    clip = graph.producer(name)
    if clip is None or clip.op_type != "Clip" or len(clip.input) < 3:
        return name
    if not graph.single_reader(name) or zero != np.iinfo(zero.dtype).min:
        return name
    low, high = (graph.constant(bound) for bound in clip.input[1:3])
    if low is None or high is None or float(low) != 0.0:
        return name
    if np.round(float(high) / float(scale)) + int(zero) < int(code_high):
        return name
    return clip.input[0]


def _fold_batchnorm(graph: _Graph, op) -> bool:  # type: ignore[no-untyped-def]
    readers = graph.readers(op.output[0])
    if len(readers) != 1 or op.output[0] in graph.outputs:
        return False
    norm = readers[0]
    weight = _weight_dequantize(graph, op)
    if norm.op_type != "BatchNormalization" or weight is None or len(norm.output) != 1:
        return False
    if len(op.input) > 2 and graph.constant(op.input[2]) is None:
        return False
    values = [graph.constant(name) for name in norm.input[1:5]]
    if any(v is None for v in values):
        return False
    gamma, beta, mean, var = (np.asarray(v, np.float64) for v in values)
    epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
    factor = gamma / np.sqrt(var + epsilon)
    if not np.all(factor > 0):
        return False
    channels = factor.shape[0]
    scale = np.broadcast_to(graph.constant(weight.input[1]).astype(np.float64), (channels,))
    zero_name = weight.input[2] if len(weight.input) > 2 else None
    codes = graph.constant(weight.input[0])
    zero = (
        np.broadcast_to(graph.constant(zero_name), (channels,)).copy()
        if zero_name
        else np.zeros(channels, codes.dtype)
    )
    bias = graph.constant(op.input[2]) if len(op.input) > 2 else np.zeros(channels)
    new_bias = (np.asarray(bias, np.float64) - mean) * factor + beta
    base = op.name.strip("/")
    del weight.input[1:]
    weight.input.extend(
        [
            graph.add_initializer((scale * factor).astype(np.float32), base + "_bn_scale"),
            graph.add_initializer(zero, base + "_bn_zero_point"),
        ]
    )
    _set_axis(weight, 0)
    bias_name = graph.add_initializer(new_bias.astype(np.float32), base + "_bn_bias")
    if len(op.input) > 2:
        op.input[2] = bias_name
    else:
        op.input.append(bias_name)
    op.output[0] = norm.output[0]
    graph.graph.node.remove(norm)
    return True


def _quantize_bias(graph: _Graph, op) -> bool:  # type: ignore[no-untyped-def]
    if len(op.input) < 3:
        return False
    bias = graph.constant(op.input[2])
    weight, inputs = _weight_dequantize(graph, op), _input_dequantize(graph, op)
    if bias is None or weight is None or inputs is None:
        return False
    input_scale = graph.constant(inputs.input[1])
    if input_scale is None or np.ndim(input_scale) != 0:
        return False
    if op.op_type == "Gemm" and any(a.name == "transB" and a.i == 0 for a in op.attribute):
        return False  # weight (in, out): its per-channel scale is not per output
    weight_scale = graph.constant(weight.input[1]).astype(np.float64)
    scale = np.broadcast_to(float(input_scale) * weight_scale, bias.shape).astype(np.float32)
    codes = np.clip(np.round(bias.astype(np.float64) / scale), *INT32).astype(np.int32)
    base = op.name.strip("/")
    from onnx import helper

    names = [
        graph.add_initializer(codes, base + "_bias_codes"),
        graph.add_initializer(scale, base + "_bias_scale"),
        graph.add_initializer(np.zeros(bias.shape, np.int32), base + "_bias_zero_point"),
    ]
    output = op.input[2] + "/dequantized"
    node = helper.make_node("DequantizeLinear", names, [output], name=base + "/bias_dq", axis=0)
    graph.graph.node.append(node)
    op.input[2] = output
    return True


def _drop_unread_nodes(graph) -> None:  # type: ignore[no-untyped-def]
    """Remove nodes whose outputs nobody reads (a bypassed ReLU6, its bound constants)."""
    while True:
        read = {name for node in graph.node for name in node.input}
        read |= {output.name for output in graph.output}
        unread = [n for n in graph.node if not any(o in read for o in n.output)]
        if not unread:
            return
        for node in unread:
            graph.node.remove(node)


def _set_axis(node, axis: int) -> None:  # type: ignore[no-untyped-def]
    from onnx import helper

    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("axis", axis)])


def _sort_topologically(graph) -> None:  # type: ignore[no-untyped-def]
    """Reorder ``graph.node`` so that every node follows the producers of its inputs."""
    produced = {output: node for node in graph.node for output in node.output}
    order, placed = [], set()

    def place(node) -> None:  # type: ignore[no-untyped-def]
        stack = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            key = id(current)
            if key in placed:
                continue
            if expanded:
                placed.add(key)
                order.append(current)
                continue
            stack.append((current, True))
            for name in current.input:
                parent = produced.get(name)
                if parent is not None and id(parent) not in placed:
                    stack.append((parent, False))

    for node in list(graph.node):
        place(node)
    copies = [type(node)() for node in order]
    for copy, node in zip(copies, order):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)

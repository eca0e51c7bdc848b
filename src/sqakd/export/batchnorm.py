"""ONNX graph pass: fold ``BatchNormalization`` into the float ``Conv`` that feeds it.

``BN(conv(x, W) + b) = conv(x, W * f) + (b - mean) * f + beta`` with
``f = gamma / sqrt(var + eps)`` per output channel. Applied only where the convolution's weight
is a plain float initializer of a layer that is not quantized: folding into a quantized layer
would change the weight its integer codes describe (and the per-layer outputs that
:func:`sqakd.export.verify_onnx` compares).
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def fold_batchnorm(proto, protected_prefixes: tuple[str, ...]) -> int:  # type: ignore[no-untyped-def]
    """Fold every eligible BatchNormalization of ``proto`` (in place); returns how many. Conv
    nodes whose name starts with one of ``protected_prefixes`` are left alone."""
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    readers = Counter(name for node in graph.node for name in node.input)
    graph_outputs = {output.name for output in graph.output}
    folded = []
    for norm in [node for node in graph.node if node.op_type == "BatchNormalization"]:
        conv = producers.get(norm.input[0])
        eligible = (
            conv is not None
            and conv.op_type == "Conv"
            and not conv.name.startswith(protected_prefixes)
            and readers[conv.output[0]] == 1
            and conv.output[0] not in graph_outputs
            and len(norm.output) == 1
            and all(name in initializers for name in [*conv.input[1:], *norm.input[1:]])
            and readers[conv.input[1]] == 1
        )
        if not eligible:
            continue
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (
            numpy_helper.to_array(initializers[name]).astype(np.float64) for name in norm.input[1:]
        )
        factor = gamma / np.sqrt(var + epsilon)
        weight = numpy_helper.to_array(initializers[conv.input[1]]).astype(np.float64)
        bias = (
            numpy_helper.to_array(initializers[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2
            else np.zeros_like(factor)
        )
        new_weight = weight * factor.reshape(-1, *[1] * (weight.ndim - 1))
        new_bias = (bias - mean) * factor + beta
        weight_name, bias_name = conv.input[1] + "/bn_folded", conv.output[0] + "/bn_bias"
        graph.initializer.extend(
            [
                numpy_helper.from_array(new_weight.astype(np.float32), weight_name),
                numpy_helper.from_array(new_bias.astype(np.float32), bias_name),
            ]
        )
        conv.input[1] = weight_name
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = norm.output[0]
        folded.append(norm)
    for norm in folded:
        graph.node.remove(norm)
    _drop_unused_initializers(graph)
    return len(folded)


def _drop_unused_initializers(graph) -> None:  # type: ignore[no-untyped-def]
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)

"""``export_onnx(..., integer_kernels=True)``: the graph ONNX Runtime turns into integer kernels
(QLinearConv), with the same predictions as PyTorch on real images; each rewrite checked on its
own (clip moved onto the codes, batch norm folded into the weight scales, int32 bias)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_cases import fit_batchnorm, quantize
from onnx import numpy_helper
from torch import nn

from sqakd.export import export_onnx, verify_onnx


def optimised_ops(path, tmp_path) -> list[str]:
    """The op types of ONNX Runtime's optimised graph (the QDQ fusions run at this level)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]


def nodes_by_output(proto):
    return {out: node for node in proto.graph.node for out in node.output}


def constants(proto):
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def exported(small_net, cifar_batch, tmp_path, method, bits, integer=True):
    images, _ = cifar_batch
    model = fit_batchnorm(quantize(small_net(), images, method, bits, bits), images)
    path = tmp_path / f"{method}{bits}{integer}.onnx"
    report = export_onnx(model, path, (1, 3, 32, 32), integer_kernels=integer)
    return model, path, report


def run(path, images, optimise=True):
    options = ort.SessionOptions()
    if not optimise:  # the graph evaluated op by op in float: what it means, not how ORT runs it
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images.numpy()})[0]


@pytest.mark.parametrize(("method", "bits"), [("lsq", 4), ("pact", 4), ("ewgs", 4), ("lsq", 8)])
def test_onnx_runtime_runs_an_integer_convolution_as_the_graph_says(
    small_net, cifar_batch, tmp_path, method, bits
):
    """SmallNet's depthwise layer feeds ReLU and the pointwise layer's quantizer: ORT runs it as
    QLinearConv (the plain export has none). The pointwise layer feeds pooling, so it keeps a
    float output. ORT's integer kernels give the predictions of the same graph evaluated in
    float (the int32 bias included)."""
    images, _ = cifar_batch
    model, path, report = exported(small_net, cifar_batch, tmp_path, method, bits)
    plain = export_onnx(model, tmp_path / "plain.onnx", (1, 3, 32, 32)).path
    assert "QLinearConv" not in optimised_ops(plain, tmp_path)
    assert optimised_ops(path, tmp_path).count("QLinearConv") == 1
    integer, reference = run(path, images), run(path, images, optimise=False)
    assert (integer.argmax(1) == reference.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(integer, reference, atol=0.05 * np.abs(reference).max())
    assert any(note.startswith("integer kernels:") for note in report.notes)


@pytest.mark.parametrize(("method", "bits"), [("lsq", 4), ("ewgs", 4)])
def test_only_the_bias_rounding_changes_the_outputs(
    small_net, cifar_batch, tmp_path, monkeypatch, method, bits
):
    """Moving the clip and folding batch norm into the weight scales change nothing beyond float
    rounding (and its rare rounding ties): without the int32 bias the graph gives PyTorch's logits. The int32 bias (what any
    integer kernel adds, ONNX Runtime's included) moves each output by at most half an
    accumulator step, which flips some of this briefly trained, low-margin network's
    predictions."""
    from sqakd.export import integer_graph

    images, labels = cifar_batch
    model, path, _ = exported(small_net, cifar_batch, tmp_path, method, bits)
    with torch.no_grad():
        expected = model(images).numpy()
    monkeypatch.setattr(integer_graph, "_quantize_bias", lambda graph, op: False)
    export_onnx(model, tmp_path / "float_bias.onnx", (1, 3, 32, 32), integer_kernels=True)
    float_bias = run(tmp_path / "float_bias.onnx", images, optimise=False)
    # per image: logits equal up to float rounding, but for the rare image where a rounding tie
    # went the other way in one activation (EWGS: PyTorch's x * n / w + b against x / s)
    same = np.isclose(float_bias, expected, atol=1e-4, rtol=1e-4).all(axis=1)
    assert same.mean() >= 0.99
    agreement = verify_onnx(path, model, images, labels).agreement
    assert agreement >= 0.9


def test_clip_moves_onto_the_codes_and_keeps_them(small_net, cifar_batch, tmp_path):
    """4-bit codes 0..15 in uint8: QuantizeLinear -> Clip(0, 15) on uint8 -> DequantizeLinear,
    and the codes equal those of the float clip before QuantizeLinear."""
    _, path, _ = exported(small_net, cifar_batch, tmp_path, "lsq", 4)
    proto = onnx.load(str(path))
    producers, values = nodes_by_output(proto), constants(proto)
    # the depthwise layer: its input (the float stem's ReLU) is the same in both exports
    conv = next(n for n in proto.graph.node if n.name == "/depthwise/depthwise.0/Conv")
    dequantize = producers[conv.input[0]]
    clip = producers[dequantize.input[0]]
    quantize_node = producers[clip.input[0]]
    assert (dequantize.op_type, clip.op_type, quantize_node.op_type) == (
        "DequantizeLinear", "Clip", "QuantizeLinear",
    )  # fmt: skip
    low, high = values[clip.input[1]], values[clip.input[2]]
    assert low.dtype == np.uint8 and (int(low), int(high)) == (0, 15)
    # the clip no longer precedes QuantizeLinear: it reads the ReLU directly
    assert producers[quantize_node.input[0]].op_type == "Relu"
    _, plain_path, _ = exported(small_net, cifar_batch, tmp_path, "lsq", 4, integer=False)
    images = cifar_batch[0][:16].numpy()
    codes = []
    for file, name in ((path, clip.output[0]), (plain_path, quantize_node.output[0])):
        model = onnx.load(str(file))
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None)
        )
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        codes.append(session.run([name], {"input": images})[0])
    np.testing.assert_array_equal(codes[0], codes[1])
    assert codes[0].max() <= 15


def test_batchnorm_folds_into_per_channel_weight_scales(small_net, cifar_batch, tmp_path):
    """scale' = scale * gamma / sqrt(var + eps) per output channel, codes unchanged, bias
    (b - mean) f + beta, quantized to int32 codes with scale input scale x weight scale."""
    images, _ = cifar_batch
    model, path, report = exported(small_net, cifar_batch, tmp_path, "lsq", 4)
    proto = onnx.load(str(path))
    producers, values = nodes_by_output(proto), constants(proto)
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    conv = next(n for n in proto.graph.node if n.name == "/depthwise/depthwise.0/Conv")
    weight_dq, bias_dq, input_dq = (
        producers[name] for name in (conv.input[1], conv.input[2], conv.input[0])
    )
    layer, norm = model.depthwise[0], model.depthwise[1]
    factor = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().numpy()
    grid = layer.weight_quantizer.grid()
    np.testing.assert_allclose(values[weight_dq.input[1]], float(grid.scale) * factor, rtol=1e-6)
    codes = layer.weight_quantizer.codes(layer.weight).detach().numpy()
    np.testing.assert_array_equal(values[weight_dq.input[0]], codes - float(grid.zero_point))
    bias = ((-norm.running_mean) * torch.from_numpy(factor) + norm.bias).detach().numpy()
    bias_scale = values[bias_dq.input[1]]
    np.testing.assert_allclose(
        bias_scale, values[input_dq.input[1]] * values[weight_dq.input[1]], rtol=1e-6
    )
    assert values[bias_dq.input[0]].dtype == np.int32
    np.testing.assert_array_equal(values[bias_dq.input[0]], np.round(bias / bias_scale))
    assert "batch norm folded into the weight scales" in report.layers[0].notes


def test_negative_batchnorm_gamma_keeps_the_batchnorm(small_net, cifar_batch, tmp_path):
    images, labels = cifar_batch
    model = fit_batchnorm(quantize(small_net(), images, "lsq", 8, 8), images)
    with torch.no_grad():
        model.depthwise[1].weight[0] = -model.depthwise[1].weight[0]
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, (1, 3, 32, 32), integer_kernels=True)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 1
    assert "depthwise.0" not in " ".join(report.notes).split("weight scales of")[0]
    assert verify_onnx(path, model, images, labels).agreement >= 0.99


class ReLU6Net(nn.Module):
    """conv-BN-ReLU6 into a quantized conv (MobileNetV2's pattern), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU6())
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.body(torch.relu(self.stem(x)))).mean(dim=(2, 3)))


def test_relu6_implied_by_the_code_clip_is_dropped(cifar_batch, tmp_path):
    images, labels = cifar_batch
    torch.manual_seed(0)
    model = fit_batchnorm(quantize(ReLU6Net(), images, "lsq", 4, 4), images)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, (1, 3, 32, 32), integer_kernels=True)
    assert "QLinearConv" in optimised_ops(path, tmp_path)
    assert verify_onnx(path, model, images, labels).agreement >= 0.99

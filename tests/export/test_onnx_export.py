"""ONNX export: integer weight initializers, QDQ activations, metadata, parity on real images."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_cases import CASES, fit_batchnorm, quantize
from onnx import numpy_helper
from torch import nn

from sqakd.export import export_onnx, read_layer_metadata, verify_onnx
from sqakd.quant import (
    LayerOverride,
    QuantConv2d,
    QuantPolicy,
    build_quantizer,
    calibrate,
    prepare,
    quantized_layers,
)
from sqakd.quant.base import QuantGrid, Quantizer
from sqakd.quant.batchnorm import AffineBatchNorm2d
from sqakd.quant.float64_sums import Float64SumConv2d, conv2d_arguments


def run_onnx(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images.numpy()})[0]


def initializers(model):
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.parametrize(("method", "weight_bits", "act_bits"), CASES)
def test_small_net_matches_onnx_runtime_on_real_images(
    small_net, cifar_batch, tmp_path, method, weight_bits, act_bits
):
    images, labels = cifar_batch
    model = quantize(small_net(), images, method, weight_bits, act_bits, first_last="same")
    fit_batchnorm(model, images)  # the batch-norm re-estimation QAT would begin with
    report = export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    check = verify_onnx(tmp_path / "m.onnx", model, images, labels)
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    assert len(predicted.unique()) >= 3  # varied predictions: agreement is not trivial
    assert check.passed and check.agreement >= 0.99, str(check)
    assert [layer.name for layer in report.layers] == [n for n, _ in quantized_layers(model)]
    assert report.file_bytes == (tmp_path / "m.onnx").stat().st_size


def integer_weight_of(proto, layer_output):
    """The integer initializer and DequantizeLinear node feeding the Conv/Gemm that produces
    ``layer_output`` (through the layer's trailing Mul by its scale and Add of its bias), and
    that Mul's node (``None`` for a layer that dequantizes before the op)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    op, scale_mul = producers[layer_output], None
    while op.op_type in ("Add", "Mul"):
        scale_mul = op if op.op_type == "Mul" else scale_mul
        op = producers[op.input[0]]
    assert op.op_type in ("Conv", "Gemm", "MatMul")  # a linear layer without bias: MatMul
    dequantize = producers[op.input[1]]
    if dequantize.op_type == "Transpose":  # MatMul(x, W^T)
        dequantize = producers[dequantize.input[0]]
    assert dequantize.op_type == "DequantizeLinear"
    return dequantize, initializers(proto), scale_mul


def with_native_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every AffineBatchNorm2d turned back into PyTorch's own nn.BatchNorm2d and
    the float64-summed first convolution into a plain nn.Conv2d: a model as it would be without
    sqakd's deployment arithmetic, whose batch norms the export folds into float convolutions."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AffineBatchNorm2d):
            native = nn.BatchNorm2d(module.num_features, module.eps)
        elif isinstance(module, Float64SumConv2d):
            native = nn.Conv2d(**conv2d_arguments(module))
        else:
            continue
        native.load_state_dict(module.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, native.eval())
    return model


@pytest.mark.parametrize("method", ["ewgs", "lsq", "dorefa"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_are_stored_as_integer_codes(small_net, cifar_batch, tmp_path, method, per_channel):
    images, _ = cifar_batch
    model = quantize(
        small_net(), images, method, 4, 4, first_last="same", per_channel_weights=per_channel
    )
    report = export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    proto = onnx.load(tmp_path / "m.onnx")
    for layer_report, (_, layer) in zip(report.layers, quantized_layers(model)):
        node, values, scale_mul = integer_weight_of(proto, layer_report.output)
        codes, unit, zero = (values[name] for name in node.input)
        assert codes.dtype == np.int8 and codes.shape == tuple(layer.weight.shape)
        # a 4-bit grid: 16 codes, doubled to odd numbers -15..15 for half-integer zero points
        assert (
            len(np.unique(codes)) <= 16
            and np.abs(codes.astype(int) - zero.reshape(-1, *[1] * (codes.ndim - 1))).max() <= 15
        )
        # integer sums: the codes enter the op as integers (unit scale); the op's output is
        # multiplied by input scale x weight scale, which PyTorch's eval forward uses too
        np.testing.assert_array_equal(unit, np.ones_like(unit))
        integer, scale, _ = layer.integer_weight()
        shape = (-1,) + (1,) * (codes.ndim - 1) if scale.dim() else ()
        zero_point = zero.reshape(shape).astype(np.float32)
        np.testing.assert_array_equal(codes.astype(np.float32) - zero_point, integer.numpy())
        act_scale = layer.act_quantizer.deployed_integer(images[:1])[1]
        product = values[scale_mul.input[1]]
        np.testing.assert_array_equal(product.reshape(-1), (act_scale * scale).reshape(-1).numpy())
        dequantized = integer.numpy() * scale.reshape(shape).numpy()
        with torch.no_grad():
            expected = layer.weight_quantizer(layer.weight).numpy()
        np.testing.assert_allclose(dequantized, expected, rtol=0, atol=1e-6)
        axis = [a.i for a in node.attribute if a.name == "axis"]
        assert (axis == [0]) == (scale.ndim == 1)


def test_metadata_keeps_the_true_bit_widths(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "lsq", 3, 5, first_last="same")
    export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    records = read_layer_metadata(tmp_path / "m.onnx")
    assert [(r["name"], r["weight_bits"], r["act_bits"]) for r in records] == [
        (name, 3, 5) for name, _ in quantized_layers(model)
    ]
    assert {r["weight_container"] for r in records} == {"int8"}
    proto = onnx.load(tmp_path / "m.onnx")
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["sqakd.input_shape"]) == [1, 3, 32, 32]


def test_activation_quantize_dequantize_pairs_use_the_grid(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "lsq", 4, 4, first_last="same")
    export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    proto = onnx.load(tmp_path / "m.onnx")
    values = initializers(proto)
    quantize_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) == len(quantized_layers(model))
    for node, (_, layer) in zip(quantize_nodes, quantized_layers(model)):
        step = float(layer.act_quantizer.step_size.detach())
        assert float(values[node.input[1]]) == pytest.approx(step)
        assert values[node.input[2]].dtype == np.uint8 and int(values[node.input[2]]) == 0


def test_batch_axis_is_dynamic(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "ewgs", 4, 4)
    export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    for batch in (1, 7):
        with torch.no_grad():
            expected = model(images[:batch]).numpy()
        np.testing.assert_allclose(
            run_onnx(tmp_path / "m.onnx", images[:batch]), expected, atol=1e-3
        )


def count_ops(path, op_type):
    return sum(node.op_type == op_type for node in onnx.load(path).graph.node)


def test_batchnorm_exports_as_the_affine_pytorch_computes(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "ewgs", 4, 4, first_last="float")  # stem conv stays float
    assert all(
        type(m) is AffineBatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    proto = onnx.load(tmp_path / "m.onnx")
    assert count_ops(tmp_path / "m.onnx", "BatchNormalization") == 0
    values = initializers(proto)
    for name in ("stem.1", "depthwise.1", "pointwise.1"):
        alpha, beta = model.get_submodule(name).affine_terms()
        np.testing.assert_array_equal(values[f"{name}.alpha"].reshape(-1), alpha.detach().numpy())
        np.testing.assert_array_equal(values[f"{name}.beta"].reshape(-1), beta.detach().numpy())
    check = verify_onnx(tmp_path / "m.onnx", model, images)
    assert check.agreement >= 0.99


def test_native_batchnorm_is_folded_only_into_float_convolutions(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "ewgs", 4, 4, first_last="float")
    model = with_native_batchnorm(model)
    folded = export_onnx(model, tmp_path / "folded.onnx", (1, 3, 32, 32))
    unfolded = export_onnx(model, tmp_path / "plain.onnx", (1, 3, 32, 32), fold_batchnorm=False)
    assert count_ops(tmp_path / "folded.onnx", "BatchNormalization") == 2
    assert count_ops(tmp_path / "plain.onnx", "BatchNormalization") == 3
    assert any("1 of 3 folded" in note for note in folded.notes)
    assert not any("folded into" in note for note in unfolded.notes)
    for path in ("folded.onnx", "plain.onnx"):
        check = verify_onnx(tmp_path / path, model, images)
        assert check.agreement >= 0.99


def test_eight_bit_half_integer_zero_point_raises_the_opset(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "ewgs", 8, 8, first_last="same")
    report = export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32), opset=17)
    proto = onnx.load(tmp_path / "m.onnx")
    assert report.opset == 21 and [o.version for o in proto.opset_import if o.domain == ""] == [21]
    assert any("opset raised from 17 to 21" in note for note in report.notes)
    assert {layer.weight_container for layer in report.layers} == {"int16"}
    assert verify_onnx(tmp_path / "m.onnx", model, images).passed


class LevelsQuantizer(Quantizer):
    """A non-uniform weight grid: the nearest of four fixed levels."""

    method = "test-levels"
    levels = torch.tensor([-0.3, -0.05, 0.05, 0.3])

    def quantize(self, x):
        return self.levels[(x.unsqueeze(-1) - self.levels).abs().argmin(dim=-1)]

    def grid(self):
        one, zero = torch.tensor(1.0), torch.tensor(0.0)
        return QuantGrid(2, 0, 3, one, zero, one, zero, None, self.levels)


def test_non_uniform_weights_fall_back_to_float_with_a_note(cifar_batch, tmp_path):
    images, _ = cifar_batch
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    layer = QuantConv2d.from_float(
        conv, LevelsQuantizer(2), build_quantizer("lsq", 4, "activation")
    )
    model = nn.Sequential(layer, nn.Flatten()).eval()
    model(images[:8])
    report = export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    assert report.layers[0].weight_export == "float (non-uniform levels)"
    assert report.float_fallbacks == ["0"]
    values = initializers(onnx.load(tmp_path / "m.onnx"))
    weight = next(v for v in values.values() if v.shape == (4, 3, 3, 3))
    assert set(np.unique(weight)) <= {np.float32(v) for v in LevelsQuantizer.levels}
    with torch.no_grad():
        np.testing.assert_allclose(
            run_onnx(tmp_path / "m.onnx", images[:8]), model(images[:8]), atol=1e-5
        )


# ----------------------------------------------------------------------------------- errors
def test_float_model_is_refused(small_net, tmp_path):
    with pytest.raises(ValueError, match="sqakd quantize.*sqakd.prepare"):
        export_onnx(small_net(), tmp_path / "m.onnx", (1, 3, 32, 32))


def test_uncalibrated_model_is_refused(small_net, tmp_path):
    from sqakd.quant import QuantPolicy, prepare

    model = prepare(small_net(), QuantPolicy(method="lsq"))
    with pytest.raises(ValueError, match="not calibrated"):
        export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))


def test_missing_output_folder_is_refused(small_net, cifar_batch, tmp_path):
    model = quantize(small_net(), cifar_batch[0], "lsq", 4, 4)
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", (1, 3, 32, 32))


@pytest.mark.parametrize("shape", [(32,), (1, 3, 0, 32), "1x3x32x32"])
def test_bad_input_shape_is_refused(small_net, cifar_batch, tmp_path, shape):
    model = quantize(small_net(), cifar_batch[0], "lsq", 4, 4)
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(model, tmp_path / "m.onnx", shape)


def test_missing_onnx_names_the_install_command(small_net, tmp_path, monkeypatch):
    import sqakd.export._optional as optional

    real = optional.importlib.import_module

    def without_onnx(name, *args):
        if name == "onnx":
            raise ImportError("No module named 'onnx'")
        return real(name, *args)

    monkeypatch.setattr(optional.importlib, "import_module", without_onnx)
    with pytest.raises(ImportError, match=r'pip install "sqakd\[export\]"'):
        export_onnx(small_net(), tmp_path / "m.onnx", (1, 3, 32, 32))


def test_level_lookup_picks_the_nearest_level_ties_down():
    from sqakd.export.view import LevelLookup

    levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0])  # midpoints 0.125 0.375 0.75 1.5
    x = torch.tensor([-3.0, 0.125, 0.126, 0.4, 0.75, 0.76, 1.49, 1.5, 1.51, 9.0])
    expected = [0.0, 0.0, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0]
    assert LevelLookup(levels)(x).tolist() == expected


def test_non_uniform_activations_export_as_a_level_lookup(cifar_batch, tmp_path):
    images, _ = cifar_batch
    torch.manual_seed(0)
    act = LevelsQuantizer(2, role="activation")
    layer = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), build_quantizer("lsq", 4, "weight"), act)
    model = nn.Sequential(layer, nn.Flatten()).eval()
    model(images[:8])
    report = export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    assert report.layers[0].act_export == "float ops (nearest of 4 levels)"
    ops = {node.op_type for node in onnx.load(tmp_path / "m.onnx").graph.node}
    assert {"Gather", "Greater", "Where"} <= ops and "QuantizeLinear" not in ops
    with torch.no_grad():
        expected = model(images[:16]).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", images[:16]), expected, atol=1e-5)


def test_folded_batchnorm_scales_the_float_convolution(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = with_native_batchnorm(quantize(small_net(), images, "lsq", 4, 4))  # stem: float
    export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    proto = onnx.load(tmp_path / "m.onnx")
    stem = next(n for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith("/stem/"))
    weight, bias = (initializers(proto)[name] for name in stem.input[1:])
    norm = model.stem[1]
    factor = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach()
    expected = model.stem[0].weight.detach() * factor.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(weight, expected.numpy(), rtol=1e-6, atol=1e-7)
    expected_bias = (norm.bias - norm.running_mean * factor).detach().numpy()
    np.testing.assert_allclose(bias, expected_bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dsq", "lsq+"])
def test_fractional_zero_points_export_as_exact_integer_sums(
    small_net, cifar_batch, tmp_path, method
):
    """Trained DSQ and LSQ+ ranges leave fractional zero points: a float shift after the input's
    dequantization, a float offset on DSQ's weights. Both become exact extra terms of the
    integer sums (sqakd.quant.integer_sums), so every layer, run in ONNX Runtime on PyTorch's
    input to it, reproduces PyTorch's output bit for bit."""
    images, _ = cifar_batch
    model = quantize(small_net(), images, method, 4, 4, first_last="same")
    with torch.no_grad():  # move every range's lower end by a fraction of a step
        for name, parameter in model.named_parameters():
            if name.endswith((".lower", ".offset")):
                parameter.add_(0.0137 * (1 + torch.rand_like(parameter)))
    report = export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    notes = [note for layer in report.layers for note in layer.notes]
    assert sum("exact terms for the input shift" in note for note in notes) == 4
    assert sum("weight offset" in note for note in notes) == (4 if method == "dsq" else 0)
    check = verify_onnx(tmp_path / "m.onnx", model, images, per_layer=True)
    assert set(check.per_layer.values()) == {0.0}, str(check)
    assert check.agreement == 1.0, str(check)


def test_a_float_first_layer_sums_in_float64_in_both_runtimes(cifar_batch, tmp_path):
    """The first convolution kept in float is summed in float64 by PyTorch's inference and by
    the graph (im2col, MatMul in double): the codes it hands the quantized layer, and so the
    model's output, are the same bits in ONNX Runtime. A plain float32 convolution instead
    differs in the last bit on most outputs, which moves some codes."""
    images, _ = cifar_batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    policy = QuantPolicy(
        method="lsq",
        weight_bits=4,
        act_bits=4,
        overrides={"2": LayerOverride(weight_bits=4, act_bits=4)},
    )
    prepared = prepare(model, policy)
    calibrate(prepared, [images[:64]])
    prepared.eval()
    report = export_onnx(prepared, tmp_path / "m.onnx", (1, 3, 32, 32))
    assert any("0: float convolution summed in float64" in note for note in report.notes)
    proto = onnx.load(tmp_path / "m.onnx")
    assert "Conv" not in {node.op_type for node in proto.graph.node if node.name.startswith("/0/")}
    with torch.no_grad():
        expected = prepared(images).numpy()
    np.testing.assert_array_equal(run_onnx(tmp_path / "m.onnx", images), expected)

    native = with_native_batchnorm(prepared)
    export_onnx(native, tmp_path / "native.onnx", (1, 3, 32, 32))
    with torch.no_grad():
        native_expected = native(images).numpy()
    assert not np.array_equal(run_onnx(tmp_path / "native.onnx", images), native_expected)

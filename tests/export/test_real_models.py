"""Export of the real architectures, ResNet-20 and MobileNetV2, for every registered quantizer.

The models are not QAT-trained here (that takes hours), so the test makes them meaningful
cheaply: ResNet-20 gets a few full-batch steps on the 300 real images, MobileNetV2 batch-norm
statistics fitted to them, and every quantized model its batch norm re-estimated (the first
thing QAT adapts). Two checks follow:

* each quantized layer, run in isolation in ONNX Runtime on exactly the input PyTorch gave it,
  matches PyTorch's output (a wrong scale, zero point, clip or weight shows at once);
* predictions agree on >= 99 % of the images.

With the default float first and last layers, every layer with integer weights must match
bit for bit, and it does: PyTorch's inference computes what the graph computes (integer sums,
batch norm as x * alpha + beta, the float first convolution summed in float64). The un-fine-tuned
MobileNetV2 is chaotic (with EWGS or DoReFa it flips 5-47 % of its predictions under 1e-6
relative input noise alone), yet ONNX Runtime agrees with PyTorch on 100 % of the 300 images for
every uniform quantizer (measured in session 6; before the float64 first layer the tests needed a
noise-floor allowance). APoT, whose non-uniform levels keep float weights, is the exception.
"""

import pytest
import torch
from export_cases import (
    CASES,
    WEIGHT_ONLY,
    fit_batchnorm,
    quantize,
    train_briefly,
)

from sqakd.export import export_onnx, verify_onnx
from sqakd.models import build_model

pytestmark = pytest.mark.slow

ISOLATED_MISMATCH = 0.005  # at most 0.5 % of a layer's outputs beyond float noise (rounding ties)
#: QAT-trained MobileNetV2 runs are checked by test_trained_runs.py (benchmarks/RESULTS.md).
NON_UNIFORM = pytest.mark.xfail(
    reason="APoT levels are non-uniform: float weights, no integer sums (on MobileNetV2 86 % "
    "agreement at W8A8, 98.7 % at W4A4)",
    strict=False,
)
MOBILENET_CASES = [
    pytest.param(*case, marks=NON_UNIFORM) if case[0] == "apot" else case for case in CASES
]


@pytest.fixture(scope="module")
def resnet20_state(cifar_batch):
    torch.manual_seed(0)
    return train_briefly(build_model("resnet20", num_classes=10), *cifar_batch, steps=10)


@pytest.fixture(scope="module")
def mobilenetv2_state(cifar_batch):
    torch.manual_seed(0)
    return fit_batchnorm(build_model("mobilenetv2", num_classes=10), cifar_batch[0]).state_dict()


def check_export(
    name, state, cifar_batch, tmp_path, method, weight_bits, act_bits, first_last="float"
):
    images, labels = cifar_batch
    model = build_model(name, num_classes=10)
    model.load_state_dict(state)
    quantized = quantize(model, images, method, weight_bits, act_bits, first_last=first_last)
    quantized = fit_batchnorm(quantized, images)
    report = export_onnx(quantized, tmp_path / f"{name}.onnx", (1, 3, 32, 32))
    check = verify_onnx(tmp_path / f"{name}.onnx", quantized, images, labels, per_layer=True)
    assert set(check.per_layer) == {layer.name for layer in report.layers}
    worst = max(check.per_layer_mismatch.items(), key=lambda item: item[1])
    assert worst[1] <= ISOLATED_MISMATCH, f"{worst} in isolation\n{check}"
    if first_last == "float":  # integer sums (below 2^24 here): the same bits in both runtimes
        integer = [layer.name for layer in report.layers if layer.weight_container]
        inexact = {n: check.per_layer[n] for n in integer if check.per_layer[n] != 0.0}
        assert not inexact, f"integer-weight layers not bit-exact in isolation: {inexact}"
    assert check.agreement >= 0.99, str(check)
    uniform = {
        layer.name for layer in report.layers if layer.weight_export != "float (non-uniform levels)"
    }
    assert all(layer.weight_container for layer in report.layers if layer.name in uniform)
    return report, check


@pytest.mark.parametrize(("method", "weight_bits", "act_bits"), CASES)
def test_resnet20(resnet20_state, cifar_batch, tmp_path, method, weight_bits, act_bits):
    check_export("resnet20", resnet20_state, cifar_batch, tmp_path, method, weight_bits, act_bits)


@pytest.mark.parametrize(("method", "weight_bits", "act_bits"), MOBILENET_CASES)
def test_mobilenetv2(mobilenetv2_state, cifar_batch, tmp_path, method, weight_bits, act_bits):
    check_export(
        "mobilenetv2", mobilenetv2_state, cifar_batch, tmp_path, method, weight_bits, act_bits
    )


#: every quantizer but the fixed-bit weight-only ones (binary, ternary: 8-bit edges do not apply)
EDGE_CASES = [
    case for case in MOBILENET_CASES if not (isinstance(case, tuple) and case[0] in WEIGHT_ONLY)
]


@pytest.mark.parametrize(("method", "weight_bits", "act_bits"), EDGE_CASES)
def test_mobilenetv2_with_8bit_edges_agrees_on_99_percent(
    mobilenetv2_state, cifar_batch, tmp_path, method, weight_bits, act_bits
):
    """With the first and last layers at 8 bits, every convolution of the network sums integer
    codes in both runtimes and batch norm is the same affine in both: only the final average
    pooling sums floats in a different order. No noise-floor allowance then: >= 99 %."""
    _, check = check_export(
        "mobilenetv2", mobilenetv2_state, cifar_batch, tmp_path, method, weight_bits, act_bits,
        first_last="8bit",
    )  # fmt: skip
    assert check.agreement >= 0.99, str(check)

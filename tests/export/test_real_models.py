"""Export of the real architectures, ResNet-20 and MobileNetV2, for every registered quantizer.

The models are not QAT-trained here (that takes hours), so the test makes them meaningful
cheaply: ResNet-20 gets a few full-batch steps on the 300 real images, MobileNetV2 batch-norm
statistics fitted to them, and every quantized model its batch norm re-estimated (the first
thing QAT adapts). Two checks follow:

* each quantized layer, run in isolation in ONNX Runtime on exactly the input PyTorch gave it,
  matches PyTorch's output (a wrong scale, zero point, clip or weight shows at once);
* predictions agree on >= 99 % of the images, or, where the un-fine-tuned low-bit model is so
  sensitive that float noise alone flips more of its predictions, at least as often as PyTorch
  agrees with itself under 1e-6 relative input noise (less one point): ONNX Runtime's
  differently ordered float arithmetic is exactly such noise.
"""

import pytest
import torch
from export_cases import CASES, fit_batchnorm, noise_agreement, quantize, train_briefly

from sqakd.export import export_onnx, verify_onnx
from sqakd.models import build_model

pytestmark = pytest.mark.slow

ISOLATED_MISMATCH = 0.005  # at most 0.5 % of a layer's outputs beyond float noise (rounding ties)
#: open (issue 5): each layer of the un-fine-tuned MobileNetV2 with EWGS or DoReFa agrees with
#: ONNX Runtime bit for bit in isolation (0.000 % of outputs differ, since activation quantizers
#: compute deployed codes in eval mode), but the convolutions' different summation order flips a
#: few codes per layer, and this network flips 5-47 % of its predictions under 1e-6 relative
#: input noise alone; ORT agrees on 48-91 %. QAT-trained MobileNetV2 runs are checked by
#: test_trained_runs.py: EWGS W4A4/W8A8 students agree on 99.03/99.66 % of the 10,000 test
#: images; 1-epoch DoReFa students (33-36 % top-1, chaotic under 1e-7 input noise) do not
#: (benchmarks/RESULTS.md)
CHAOTIC = pytest.mark.xfail(
    reason="un-fine-tuned MobileNetV2 amplifies rounding ties", strict=False
)
MOBILENET_CASES = [
    pytest.param(*case, marks=CHAOTIC) if case[0] in ("ewgs", "dorefa") else case
    for case in CASES
    if case[0] in ("ewgs", "lsq", "dorefa", "apot")
]


@pytest.fixture(scope="module")
def resnet20_state(cifar_batch):
    torch.manual_seed(0)
    return train_briefly(build_model("resnet20", num_classes=10), *cifar_batch, steps=10)


@pytest.fixture(scope="module")
def mobilenetv2_state(cifar_batch):
    torch.manual_seed(0)
    return fit_batchnorm(build_model("mobilenetv2", num_classes=10), cifar_batch[0]).state_dict()


def check_export(name, state, cifar_batch, tmp_path, method, weight_bits, act_bits):
    images, labels = cifar_batch
    model = build_model(name, num_classes=10)
    model.load_state_dict(state)
    quantized = fit_batchnorm(quantize(model, images, method, weight_bits, act_bits), images)
    report = export_onnx(quantized, tmp_path / f"{name}.onnx", (1, 3, 32, 32))
    check = verify_onnx(tmp_path / f"{name}.onnx", quantized, images, labels, per_layer=True)
    assert set(check.per_layer) == {layer.name for layer in report.layers}
    worst = max(check.per_layer_mismatch.items(), key=lambda item: item[1])
    assert worst[1] <= ISOLATED_MISMATCH, f"{worst} in isolation\n{check}"
    floor = noise_agreement(quantized, images)
    assert check.agreement >= min(0.99, floor - 0.01), f"{check}\nnoise agreement {floor:.2%}"
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

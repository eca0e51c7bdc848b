"""verify_onnx: agreement, top-1, per-layer differences, and what makes it fail."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_cases import quantize

from sqakd.export import export_onnx, verify_onnx
from sqakd.quant import quantized_layers


@pytest.fixture
def exported(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "lsq", 4, 4, first_last="same")
    export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    return model, tmp_path / "m.onnx"


def test_report_matches_a_direct_comparison(exported, cifar_batch):
    model, path = exported
    images, labels = cifar_batch
    report = verify_onnx(path, model, images, labels)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input": images.numpy()})[0]
    with torch.no_grad():
        torch_logits = model(images).numpy()
    torch_pred, onnx_pred = torch_logits.argmax(1), onnx_logits.argmax(1)
    assert report.samples == len(images)
    assert report.agreement == pytest.approx((torch_pred == onnx_pred).mean())
    assert report.torch_top1 == pytest.approx((torch_pred == labels.numpy()).mean())
    assert report.onnx_top1 == pytest.approx((onnx_pred == labels.numpy()).mean())
    assert report.max_abs_diff == pytest.approx(np.abs(torch_logits - onnx_logits).max(), abs=1e-6)
    assert report.passed and "PASSED" in str(report)


def test_batches_with_labels_give_the_same_report(exported, cifar_batch):
    model, path = exported
    images, labels = cifar_batch
    whole = verify_onnx(path, model, images, labels)
    batches = [(images[i : i + 64], labels[i : i + 64]) for i in range(0, len(images), 64)]
    split = verify_onnx(path, model, batches)
    assert (split.samples, split.agreement, split.torch_top1) == (
        whole.samples,
        whole.agreement,
        whole.torch_top1,
    )
    assert verify_onnx(path, model, [images[:100], images[100:]]).torch_top1 is None


def test_per_layer_reports_every_quantized_layer(exported, cifar_batch):
    model, path = exported
    images, _ = cifar_batch
    report = verify_onnx(path, model, images[:64], per_layer=True)
    assert list(report.per_layer) == [name for name, _ in quantized_layers(model)]
    # the same grid in both runtimes: a layer's output differs by at most a few rounding flips
    outputs = {}
    hooks = [
        layer.register_forward_hook(lambda m, i, o, n=name: outputs.__setitem__(n, o))
        for name, layer in quantized_layers(model)
    ]
    with torch.no_grad():
        model(images[:64])
    for hook in hooks:
        hook.remove()
    for name, diff in report.per_layer.items():
        assert 0 <= diff < 0.1 * float(outputs[name].abs().max())


def test_a_different_model_fails_the_check(exported, small_net, cifar_batch):
    model, path = exported
    images, labels = cifar_batch
    other = quantize(small_net(), images, "lsq", 4, 4, first_last="same")
    with torch.no_grad():
        for _, layer in quantized_layers(other):
            layer.weight.mul_(-1)  # a model the file was not exported from
    report = verify_onnx(path, other, images, labels)
    assert not report.passed and report.agreement < 0.9 and "FAILED" in str(report)


def test_missing_onnxruntime_names_the_install_command(exported, cifar_batch, monkeypatch):
    import sqakd.export._optional as optional

    real = optional.importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args)

    monkeypatch.setattr(optional.importlib, "import_module", without_onnxruntime)
    model, path = exported
    with pytest.raises(
        ImportError, match=r'onnxruntime is not installed; pip install "sqakd\[export\]"'
    ):
        verify_onnx(path, model, cifar_batch[0][:4])


def test_bad_arguments_are_refused(exported, cifar_batch, tmp_path):
    model, path = exported
    images, labels = cifar_batch
    with pytest.raises(ValueError, match="not found"):
        verify_onnx(tmp_path / "nothing.onnx", model, images)
    with pytest.raises(ValueError, match="threshold"):
        verify_onnx(path, model, images, threshold=1.5)
    with pytest.raises(ValueError, match="labels"):
        verify_onnx(path, model, images, labels[:10])
    with pytest.raises(ValueError, match="no images"):
        verify_onnx(path, model, [])

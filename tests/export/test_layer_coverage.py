"""Layer types beyond Conv2d/Linear: each model gets its layers quantized, trains one step,
exports, and ONNX Runtime computes what PyTorch computes (bit for bit where every layer with
weights is quantized; a transformer's quantized layers exact, its float attention within float
noise)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sqakd.distill import kd_kl_divergence
from sqakd.export import export_onnx, verify_onnx
from sqakd.quant import (
    LayerOverride,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose2d,
    QuantLinear,
    QuantPolicy,
    calibrate,
    describe,
    prepare,
    quantized_layers,
)
from sqakd.quant.batchnorm import AffineBatchNorm

pytest.importorskip("onnxruntime")


class AudioNet(nn.Module):
    """Conv1d-BN1d-ReLU stages (one strided, one grouped) and a linear head: (N, 1, L) -> (N, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Conv1d(8, 16, 3, stride=2, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=2))


class UpNet(nn.Module):
    """A segmentation-shaped decoder: Conv2d, two ConvTranspose2d (strided; grouped), 1x1
    classifier: (N, 3, H, W) -> (N, 3, 2H, 2W) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 8, 2, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 4, 3, padding=1, groups=4), nn.ReLU(),
            nn.Conv2d(4, 3, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VolumeNet(nn.Module):
    """Conv3d-BN3d-ReLU stages and a linear head: (N, 2, D, H, W) -> (N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
            nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


class StdConv2d(nn.Conv2d):
    """timm-style subclass that only changes the constructor (the parent's forward)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class FrozenBatchNorm(nn.BatchNorm2d):
    """A batch-norm subclass without its own forward."""


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 8, 3)
        self.bn = FrozenBatchNorm(8)
        self.body = StdConv2d(8, 8, 3)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.body(torch.relu(self.bn(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Token ids -> (N, T, V) logits: an embedding, one attention block, a feed-forward block."""

    def __init__(self, vocabulary: int = 20, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.out = nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.norm(x + self.attention(x, x, x, need_weights=False)[0])
        x = x + self.down(torch.relu(self.up(x)))
        return self.out(x)


def _inputs(kind: str, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shapes = {"audio": (1, 64), "up": (3, 6, 6), "volume": (2, 6, 6, 6), "sub": (3, 8, 8)}
    if kind == "tokens":
        return torch.randint(0, 20, (count, 7), generator=generator)
    return torch.randn(count, *shapes[kind], generator=generator)


CASES = {
    "audio": (AudioNet, {QuantConv1d: 3, QuantLinear: 1}, 1),
    "up": (UpNet, {QuantConv2d: 2, QuantConvTranspose2d: 2}, 1),
    "volume": (VolumeNet, {QuantConv3d: 2, QuantLinear: 1}, 1),
    "sub": (SubclassNet, {QuantConv2d: 2, QuantLinear: 1}, 1),
}


def _prepared(teacher: nn.Module, data: torch.Tensor) -> nn.Module:
    policy = QuantPolicy(method="lsq", weight_bits=4, act_bits=4, first_last="8bit")
    student = prepare(teacher, policy)
    labels = torch.zeros(len(data), dtype=torch.long)
    loader = DataLoader(TensorDataset(data, labels), batch_size=16)  # (x, y) pairs
    calibrate(student, loader)
    return student


def _train_one_step(student: nn.Module, teacher: nn.Module, data: torch.Tensor, class_dim=1):
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
    with torch.no_grad():
        target = teacher(data)
    loss = kd_kl_divergence(student(data), target, 4.0, class_dim)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    return student.eval()


def _fit_batchnorm(model: nn.Module, data: torch.Tensor) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(data)
    return model.eval()


@pytest.mark.parametrize("kind", list(CASES))
def test_layers_are_quantized_trained_and_exported_bit_exact(kind, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    build, expected, class_dim = CASES[kind]
    data = _inputs(kind, 32)
    teacher = _fit_batchnorm(build(), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left in float silently
        # the first layer's signed test inputs meet an unsigned grid: calibrate says so (another
        # subject: tests/quant/test_clipped_negatives.py)
        warnings.filterwarnings("ignore", message="sqakd.calibrate: .* negative inputs")
        student = _prepared(teacher, data)
    counts = {t: sum(type(m) is t for m in student.modules()) for t in expected}
    assert counts == expected
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(m, AffineBatchNorm)
                   for m in student.modules())  # fmt: skip
    assert "WARNING" not in str(describe(student))
    student = _train_one_step(student, teacher, data, class_dim)

    report = export_onnx(student, tmp_path / "m.onnx", example_inputs=data[:1])
    assert not report.float_fallbacks
    assert "no BatchNormalization node" in " ".join(report.notes)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": data.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_array_equal(onnx_out, student(data).numpy())  # bit for bit
    verified = verify_onnx(tmp_path / "m.onnx", student, data, per_layer=True)
    assert verified.passed and verified.agreement == 1.0
    assert all(v == 0.0 for v in verified.per_layer_mismatch.values())


def test_segmentation_output_is_verified_per_pixel(tmp_path):
    torch.manual_seed(0)
    data = _inputs("up", 8)
    student = _prepared(_fit_batchnorm(UpNet(), data), data).eval()
    export_onnx(student, tmp_path / "m.onnx", input_shape=(1, 3, 6, 6))
    report = verify_onnx(tmp_path / "m.onnx", student, data)
    assert report.samples == 8 and report.predictions == 8 * 12 * 12
    assert report.agreement <= 1.0
    assert f"of {8 * 12 * 12} predictions in 8 images" in str(report)


def test_transformer_linears_and_attention_projections_are_quantized(tmp_path):
    torch.manual_seed(0)
    tokens = _inputs("tokens", 16)
    teacher = TinyTransformer().eval()
    with pytest.warns(UserWarning) as caught:
        student = _prepared(teacher, tokens)
    message = " ".join(str(w.message) for w in caught if "sqakd.prepare" in str(w.message))
    assert "attention" not in message  # quantized: sqakd.quant.attention
    # the default unsigned grid meets the signed attention inputs: calibrate names them
    clipped = " ".join(str(w.message) for w in caught if "sqakd.calibrate" in str(w.message))
    assert "attention.q_proj (" in clipped and "act_options: {signed: true}" in clipped
    assert "embed (Embedding)" in message  # kept in float unless quant.embeddings
    projections = {f"attention.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert {n for n, _ in quantized_layers(student)} == {"up", "down", "out"} | projections
    assert type(student.attention.out_proj) is QuantLinear
    student = _train_one_step(student, teacher, tokens, class_dim=-1)

    export_onnx(student, tmp_path / "m.onnx", example_inputs=tokens[:2])
    report = verify_onnx(tmp_path / "m.onnx", student, tokens, per_layer=True, class_dim=-1)
    assert report.predictions == 16 * 7 and report.passed
    assert set(report.per_layer) == {"up", "down", "out"} | projections
    assert all(v == 0.0 for v in report.per_layer_mismatch.values())  # quantized layers exact


def test_a_forward_that_cannot_be_traced_names_the_layer(tmp_path):
    data = _inputs("audio", 16)
    student = _prepared(_fit_batchnorm(AudioNet(), data), data).eval()
    with pytest.raises(
        ValueError, match=r"cannot be traced for ONNX export: in layer features\.0 "
    ):
        export_onnx(student, tmp_path / "m.onnx", input_shape=(1, 5, 64))  # 5 channels, not 1


@pytest.mark.parametrize("kind", ["audio", "volume"])
def test_a_float_first_1d_or_3d_convolution_sums_in_float64_in_both_runtimes(kind, tmp_path):
    """With the first layer kept in float (the papers' convention), a Conv1d/Conv3d first layer
    is summed in float64 by PyTorch's inference and by the graph (strided slices, MatMul in
    double): ONNX Runtime computes the same bits (the head is quantized too: a float32 head
    would differ in the last bit between the runtimes, as any float32 layer may)."""
    import onnx
    import onnxruntime as ort

    from sqakd.quant.float64_sums import FLOAT64_SUM_TWINS

    torch.manual_seed(0)
    build, _, _ = CASES[kind]
    data = _inputs(kind, 32)
    teacher = _fit_batchnorm(build(), data)
    last = {"head": LayerOverride(weight_bits=4, act_bits=4)}  # a float32 head: order noise
    student = prepare(teacher, QuantPolicy(method="lsq", overrides=last))
    first = student.features[0]
    assert type(first) in set(FLOAT64_SUM_TWINS.values())
    calibrate(student, [data])
    student.eval()
    report = export_onnx(student, tmp_path / "m.onnx", example_inputs=data[:1])
    assert any("float convolution summed in float64" in note for note in report.notes)
    proto = onnx.load(tmp_path / "m.onnx")
    first_ops = {node.op_type for node in proto.graph.node if "/features.0/" in node.name}
    assert "MatMul" in first_ops and "Conv" not in first_ops
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = student(data).numpy()
    np.testing.assert_array_equal(session.run(None, {"input": data.numpy()})[0], expected)

"""nn.Embedding's quantized twin: opt-in (``quant.embeddings``), its table on the weight
quantizer's grid, no input quantizer (the inputs are indices), exported as an exact Gather."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sqakd.config import config_reference, load_config
from sqakd.quant import (
    QuantEmbedding,
    QuantPolicy,
    calibrate,
    describe,
    plan,
    prepare,
    set_quantization,
)

VOCABULARY, WIDTH = 30, 8


class Tagger(nn.Module):
    """Token ids -> (N, T, 5) logits: an embedding (with a padding row) and a linear head."""

    def __init__(self, **embedding_options) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH, padding_idx=0, **embedding_options)
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def tokens(count: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, VOCABULARY, (count, 6), generator=generator)


def policy(**changes) -> QuantPolicy:
    return QuantPolicy(**{"method": "lsq", "first_last": "same", "embeddings": True, **changes})


def test_embeddings_stay_float_by_default_and_the_warning_says_how_to_quantize_them():
    assert QuantPolicy().embeddings is False
    with pytest.warns(UserWarning) as caught:
        student = prepare(Tagger(), QuantPolicy(method="lsq", first_last="same"))
    messages = [str(w.message) for w in caught]
    assert any("embed (Embedding): " in m and "quant.embeddings: true" in m for m in messages)
    assert any("only 14.3% of the weights" in m and "quant.embeddings: true" in m for m in messages)
    assert type(student.embed) is nn.Embedding
    row = next(r for r in describe(student) if r.name == "embed")
    assert not row.supported and "quant.embeddings" in row.note
    assert "| `quant.embeddings` | bool | `False` |" in config_reference()
    assert load_config(None, ["quant.embeddings=true"]).quant.embeddings is True


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_table_is_on_the_quantizers_grid_and_the_input_is_not_quantized(per_channel):
    torch.manual_seed(0)
    teacher = Tagger().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in float
        student = prepare(teacher, policy(per_channel_weights=per_channel, weight_bits=3))
    embed = student.embed
    assert type(embed) is QuantEmbedding and embed.act_quantizer is None
    assert embed.weight is not teacher.embed.weight  # a copy, like every prepared model
    assert embed.weight_quantizer.per_channel is per_channel
    rows = {r.name: r for r in plan(teacher, policy())}
    assert rows["embed"].weight_bits == 4 and rows["embed"].act_bits == 32  # "float" input
    calibrate(student, [tokens()])
    quantizer = embed.weight_quantizer
    values = embed.quantized_weight().detach()
    grid = quantizer.grid()
    codes = quantizer.codes(embed.weight.detach())
    assert codes.unique().numel() <= 2**3 and bool((codes >= grid.qmin).all())
    torch.testing.assert_close(values, grid.dequantize(codes), rtol=0, atol=1e-6)
    assert values.unique().numel() <= (2**3) * (VOCABULARY if per_channel else 1)
    ids = tokens()
    for mode in ("train", "eval"):  # the fake-quantized table, and the deployed one
        embed.train(mode == "train")
        with torch.no_grad():
            torch.testing.assert_close(embed(ids), values[ids], rtol=0, atol=1e-6)
    with torch.no_grad():
        set_quantization(student, False)
        assert torch.equal(student.eval()(ids), teacher(ids))  # off: the float model exactly


def test_state_dict_names_gradients_and_a_training_step():
    torch.manual_seed(0)
    teacher = Tagger().eval()
    student = prepare(teacher, policy()).train()
    float_keys, keys = set(teacher.state_dict()), set(student.state_dict())
    assert float_keys <= keys
    assert all("_quantizer." in k or k.endswith(".calibrated") for k in keys - float_keys)
    ids = tokens()
    before = student.embed.weight.detach().clone()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    loss = student(ids).square().mean()
    loss.backward()
    assert student.embed.weight.grad[ids.unique()].abs().sum() > 0
    assert student.embed.weight.grad[0].abs().sum() == 0  # the padding row gets no gradient
    assert student.embed.weight_quantizer.step_size.grad is not None
    optimizer.step()
    assert not torch.equal(student.embed.weight, before)


@pytest.mark.parametrize(
    ("options", "reason"),
    [({"max_norm": 1.0}, "renormalises its rows"), ({"sparse": True}, "sparse gradients")],
)
def test_embeddings_that_change_their_table_or_take_sparse_gradients_stay_float(options, reason):
    with pytest.warns(UserWarning, match=reason):
        student = prepare(Tagger(**options), policy())
    assert type(student.embed) is nn.Embedding


def test_export_is_an_exact_gather_of_dequantized_codes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from sqakd.export import export_onnx, verify_onnx

    torch.manual_seed(0)
    student = prepare(Tagger().eval(), policy())
    ids = tokens(32)
    calibrate(student, [ids])
    student.eval()
    report = export_onnx(student, tmp_path / "m.onnx", example_inputs=ids[:2])
    layer = next(r for r in report.layers if r.name == "embed")
    assert layer.weight_export.startswith("int8 codes") and layer.act_export == "none (indices)"
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = student(ids).numpy()
    np.testing.assert_array_equal(session.run(None, {"input": ids.numpy()})[0], expected)
    verified = verify_onnx(tmp_path / "m.onnx", student, ids, per_layer=True, class_dim=-1)
    assert verified.per_layer == {"embed": 0.0, "head": 0.0}  # the ids reach the layer as ids

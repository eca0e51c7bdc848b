"""nn.MultiheadAttention's quantized twin: its four projections are quantized layers (weights and
the activations entering them), the attention arithmetic stays float, the state_dict keeps
nn.MultiheadAttention's names, and the export runs in ONNX Runtime."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.quant import (
    QuantLinear,
    QuantPolicy,
    calibrate,
    describe,
    plan,
    prepare,
    quantized_layers,
    quantizer_parameters,
    set_quantization,
)
from sqakd.quant.attention import AttentionProjection, QuantMultiheadAttention, attend

#: attention inputs are signed (embeddings, layer norms, attention outputs): signed LSQ grids
#: for activations (the library's default activation grid is unsigned, for post-ReLU inputs)
POLICY = QuantPolicy(
    method="lsq", weight_bits=4, act_bits=4, first_last="same", act_options={"signed": True}
)
#: other grids: EWGS weights (half-integer zero point) with LSQ+ inputs (fractional zero point:
#: the integer sums' shift terms); DSQ per output channel
OTHER_POLICIES = {
    "ewgs weights, lsq+ inputs": QuantPolicy(
        weight_method="ewgs", act_method="lsq+", weight_bits=3, act_bits=4, first_last="same"
    ),
    "dsq per channel": QuantPolicy(
        method="dsq",
        weight_bits=4,
        act_bits=4,
        first_last="same",
        per_channel_weights=True,
        act_options={"signed": True},
    ),  # fmt: skip
}
WIDTH, HEADS, VOCABULARY, TOKENS = 16, 2, 20, 7


class Block(nn.Module):
    """Token ids -> (N, T, V) logits: an embedding, one attention with a residual, a linear head."""

    def __init__(self, need_weights: bool = True, causal: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCABULARY)
        self.need_weights, self.causal = need_weights, causal

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        mask = None
        if self.causal:
            length = tokens.shape[1]
            mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        attended = self.attention(x, x, x, need_weights=self.need_weights, attn_mask=mask)[0]
        return self.head(x + attended)


def tokens(count: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, VOCABULARY, (count, TOKENS), generator=torch.Generator().manual_seed(seed)
    )


def prepared_block(policy: QuantPolicy = POLICY, **options) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = Block(**options).eval()
    student = prepare(teacher, policy)
    calibrate(student, [tokens()])
    return teacher, student


# ------------------------------------------------------------------------ attention variants
#: constructor options and call options of each variant (masks built by ``_call``)
VARIANTS = {
    "self, batch first": (dict(batch_first=True), dict()),
    "sequence first, weights per head": (dict(), dict(average_attn_weights=False)),
    "cross, kdim/vdim": (dict(kdim=6, vdim=5), dict()),
    "no bias, bias_kv, zero attention": (
        dict(bias=False, add_bias_kv=True, add_zero_attn=True),
        dict(),
    ),
    "padding and causal masks": (dict(batch_first=True), dict(key_padding=True, causal=True)),
    "float mask, no weights": (dict(), dict(float_mask=True, need_weights=False)),
    "causal hint, no weights": (
        dict(batch_first=True),
        dict(causal=True, is_causal=True, need_weights=False),
    ),  # fmt: skip
    "unbatched": (dict(), dict(unbatched=True)),
}


def _inputs(attention: nn.MultiheadAttention, options: dict, batch: int = 3, length: int = 5):
    """``(query, key, value)`` and the call's keyword arguments for one variant."""
    generator = torch.Generator().manual_seed(3)
    sizes = (attention.embed_dim, attention.kdim, attention.vdim)
    shape = (batch, length) if attention.batch_first else (length, batch)
    if options.get("unbatched"):
        shape = (length,)
    query, key, value = (torch.randn(*shape, size, generator=generator) for size in sizes)
    if attention._qkv_same_embed_dim and not options.get("unbatched"):
        key = value = query  # self-attention
    kwargs = {
        k: options[k] for k in ("need_weights", "average_attn_weights", "is_causal") if k in options
    }
    if options.get("key_padding"):
        padding = torch.zeros(batch, length, dtype=torch.bool)
        padding[0, -2:] = True
        kwargs["key_padding_mask"] = padding
    if options.get("causal"):
        kwargs["attn_mask"] = torch.ones(length, length, dtype=torch.bool).triu(1)
    if options.get("float_mask"):
        kwargs["attn_mask"] = torch.randn(length, length, generator=generator)
    return (query, key, value), kwargs


def _attention(**arguments) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(WIDTH, HEADS, **arguments)
    if attention.in_proj_bias is not None:
        with torch.no_grad():  # nn.MultiheadAttention starts with zero biases
            attention.in_proj_bias.normal_(0, 0.1)
    return attention


def _twin(
    attention: nn.MultiheadAttention, policy: QuantPolicy = POLICY
) -> QuantMultiheadAttention:
    quantized = prepare(nn.Sequential(attention), policy)[0]
    assert isinstance(quantized, QuantMultiheadAttention)
    return quantized


def _quantized_reference(twin: QuantMultiheadAttention, query, key, value, **kwargs):
    """The twin's output built by hand: every projection's input and weight through its own
    quantizers, F.multi_head_attention_forward with those weights and an identity output
    projection (exact: each output is one input times 1.0 plus zeros), then the quantized
    output projection."""
    projections = [twin.q_proj, twin.k_proj, twin.v_proj]
    inputs = [p.act_quantizer(x) for p, x in zip(projections, (query, key, value))]
    weights = [p.weight_quantizer(p.weight) for p in projections]
    batched = query.dim() == 3
    if twin.batch_first and batched:
        inputs = [x.transpose(0, 1) for x in inputs]
    identity = torch.eye(twin.embed_dim)
    attended, attention_weights = F.multi_head_attention_forward(
        *inputs, twin.embed_dim, twin.num_heads, None, twin.in_proj_bias, twin.bias_k,
        twin.bias_v, twin.add_zero_attn, twin.dropout, identity, None, training=twin.training,
        use_separate_proj_weight=True, q_proj_weight=weights[0], k_proj_weight=weights[1],
        v_proj_weight=weights[2], **kwargs,
    )  # fmt: skip
    out = twin.out_proj
    out = F.linear(out.act_quantizer(attended), out.weight_quantizer(out.weight), out.bias)
    if twin.batch_first and batched:
        out = out.transpose(0, 1)
    return out, attention_weights


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantization_off_is_the_float_attention_exactly(variant):
    arguments, options = VARIANTS[variant]
    attention = _attention(**arguments)
    twin = _twin(attention)
    inputs, kwargs = _inputs(attention, options)
    for mode in ("train", "eval"):
        attention.train(mode == "train")
        twin.train(mode == "train")
        with torch.no_grad():
            twin(*inputs, **kwargs)  # calibrates
            set_quantization(twin, False)
            out, weights = twin(*inputs, **kwargs)
            expected, expected_weights = attention(*inputs, **kwargs)
            set_quantization(twin, True)
        assert torch.equal(out, expected)
        assert (weights is None) == (expected_weights is None)
        if weights is not None:
            assert torch.equal(weights, expected_weights)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attend_with_float_projections_is_pytorchs_attention(variant):
    """The float core between the projections computes what F.multi_head_attention_forward
    computes, for every option the module takes."""
    arguments, options = VARIANTS[variant]
    attention = _attention(**arguments).train()  # dropout 0: train and eval alike
    inputs, kwargs = _inputs(attention, options)
    twin = QuantMultiheadAttention.from_float(attention, {})  # every projection float
    query, key, value = inputs
    if not options.get("unbatched") and attention.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    elif options.get("unbatched"):
        query, key, value = (x.unsqueeze(1) for x in (query, key, value))
    with torch.no_grad():
        out, weights = attend(twin, twin.q_proj(query), twin.k_proj(key), twin.v_proj(value), **kwargs)  # fmt: skip
        expected, expected_weights = attention(*inputs, **kwargs)
    if options.get("unbatched"):
        out, weights = out.squeeze(1), None if weights is None else weights.squeeze(0)
    elif attention.batch_first:
        out = out.transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    if expected_weights is not None:
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-6)


POLICIES = {"signed lsq": POLICY, **OTHER_POLICIES}
#: every variant with signed LSQ, a few with the other grids
REFERENCE_CASES = [(variant, "signed lsq") for variant in VARIANTS] + [
    (variant, policy)
    for policy in OTHER_POLICIES
    for variant in ("self, batch first", "cross, kdim/vdim", "padding and causal masks")
]


@pytest.mark.parametrize(("variant", "policy"), REFERENCE_CASES)
def test_quantized_attention_is_the_brute_force_reference(variant, policy):
    arguments, options = VARIANTS[variant]
    attention = _attention(**arguments)
    twin = _twin(attention, POLICIES[policy]).train()
    inputs, kwargs = _inputs(attention, options)
    out, weights = twin(*inputs, **kwargs)  # calibrates, then the fake-quantized forward
    out, weights = twin(*inputs, **kwargs)
    expected, expected_weights = _quantized_reference(twin, *inputs, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    if expected_weights is not None:
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        float_out = attention(*inputs, **kwargs)[0]
    assert not torch.allclose(out, float_out, atol=1e-3)  # quantization changed something

    # inference (eval, no autograd): the projections run on integer codes, the same values
    # up to float rounding
    twin.eval()
    with torch.no_grad():
        deployed = twin(*inputs, **kwargs)[0]
        expected = _quantized_reference(twin, *inputs, **kwargs)[0]
    torch.testing.assert_close(deployed, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ in a model
def test_prepare_quantizes_the_four_projections():
    teacher, student = prepared_block()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(teacher, POLICY.model_copy(update={"first_last": "8bit"}))
    message = " ".join(str(w.message) for w in caught)
    assert "attention" not in message and "embed (Embedding)" in message  # embeddings: opt-in
    attention = student.attention
    assert isinstance(attention, QuantMultiheadAttention)
    assert sum(isinstance(m, AttentionProjection) for m in student.modules()) == 3
    assert type(attention.out_proj) is QuantLinear
    names = {n for n, _ in quantized_layers(student)}
    assert names == {
        "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj", "head"
    }  # fmt: skip
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer = getattr(attention, name)
        assert layer.weight_quantizer.bits == 4 and layer.act_quantizer.bits == 4
        assert layer.weight_quantizer.is_initialized and bool(layer.calibrated)
    # the projections read the attention's own parameters (views: no copy)
    packed = attention.in_proj_weight
    assert attention.k_proj.weight.data_ptr() == packed[WIDTH:].data_ptr()
    assert attention.v_proj.bias.data_ptr() == attention.in_proj_bias[2 * WIDTH :].data_ptr()
    rows = {r.name: r for r in plan(teacher, POLICY)}
    assert [n for n in rows if n.startswith("attention")] == [
        "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj"
    ]  # fmt: skip
    assert rows["attention.k_proj"].projection == "k_proj" and rows["attention.k_proj"].quantized
    table = {r.name: r for r in describe(student)}
    assert {"attention.q_proj", "attention.out_proj"} <= set(table)
    assert table["attention.v_proj"].kind == "AttentionProjection"
    assert table["attention.v_proj"].weight_bits == 4
    assert "attention" not in table  # the attention itself is not a row: its projections are


def test_state_dict_keeps_multihead_attention_names_and_loads_both_ways():
    teacher, student = prepared_block()
    float_keys, student_keys = set(teacher.state_dict()), set(student.state_dict())
    extra = student_keys - float_keys
    assert float_keys <= student_keys
    assert extra and all("_quantizer." in k or k.endswith(".calibrated") for k in extra)
    assert {k for k in student_keys if k.startswith("attention.") and k not in extra} == {
        "attention.in_proj_weight", "attention.in_proj_bias",
        "attention.out_proj.weight", "attention.out_proj.bias",
    }  # fmt: skip
    # a float checkpoint loads into the twin: only quantizer keys are missing
    other = Block().eval()
    result = student.load_state_dict(other.state_dict(), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == extra
    set_quantization(student, False)
    with torch.no_grad():
        assert torch.equal(student.eval()(tokens()), other(tokens()))
    # and the twin's checkpoint loads into the float model: only quantizer keys are left over
    fresh = Block().eval()
    result = fresh.load_state_dict(student.state_dict(), strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == extra
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), other(tokens()))
    # and a prepared model's checkpoint, quantizers included, into a fresh prepared model
    set_quantization(student, True)
    twin = prepare(Block(), POLICY).eval()
    twin.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(tokens()), student(tokens()))


def test_one_step_trains_weights_and_quantizers_and_the_loss_falls():
    teacher, student = prepared_block()
    student.train()
    data = tokens(32)
    with torch.no_grad():
        target = teacher(data).softmax(dim=-1)
    attention = student.attention
    before = {
        "in_proj_weight": attention.in_proj_weight.detach().clone(),
        "out_proj.weight": attention.out_proj.weight.detach().clone(),
    }
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(student(data).flatten(0, 1), target.flatten(0, 1))
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            quantizer_grads = {
                name: p.grad
                for name, p in student.named_parameters()
                if name.startswith("attention.") and "_quantizer." in name
            }
            assert len(quantizer_grads) == 8  # weight and input step sizes of four projections
            assert all(g is not None and g.abs().sum() > 0 for g in quantizer_grads.values())
            assert attention.in_proj_weight.grad.abs().sum(dim=1).gt(0).all()  # q, k, v rows
        optimizer.step()
        losses.append(float(loss))
    assert not torch.equal(attention.in_proj_weight, before["in_proj_weight"])
    assert not torch.equal(attention.out_proj.weight, before["out_proj.weight"])
    assert losses[-1] < losses[0]
    assert {id(p) for p in quantizer_parameters(student)} >= {
        id(p) for n, p in attention.named_parameters() if "_quantizer." in n
    }


def test_policy_patterns_and_first_last_reach_each_projection():
    teacher = Block().eval()
    overrides = {"attention.out_proj": {"weight_bits": 8, "act_bits": 8}}
    policy = QuantPolicy(**{**POLICY.model_dump(), "overrides": overrides})
    student = prepare(teacher, policy)
    assert student.attention.out_proj.weight_quantizer.bits == 8
    assert student.attention.q_proj.weight_quantizer.bits == 4

    # an attention first in the model: first_last=float keeps its three input projections
    # (they all read the model's input) in float, and quantizes the rest
    model = nn.Sequential()
    model.attention = nn.MultiheadAttention(WIDTH, HEADS)
    model.head = nn.Linear(WIDTH, 3)
    rows = {r.name: r for r in plan(model, POLICY.model_copy(update={"first_last": "float"}))}
    assert [rows[f"attention.{p}"].quantized for p in ("q_proj", "k_proj", "v_proj")] == [False] * 3
    assert rows["attention.out_proj"].quantized and not rows["head"].quantized
    with pytest.raises(ValueError, match="matches no quantizable layer; layer names are e.g. "
                       r"attention\.q_proj"):  # fmt: skip
        plan(model, QuantPolicy(**{**POLICY.model_dump(), "overrides": {"attention.in_proj": {}}}))


def test_a_copy_reads_its_own_parameters():
    _, student = prepared_block()
    copied = copy.deepcopy(student)
    attention = copied.attention
    assert all(getattr(attention, p)._owner is attention for p in ("q_proj", "k_proj", "v_proj"))
    with torch.no_grad():
        attention.in_proj_weight.add_(1.0)
    assert torch.equal(attention.q_proj.weight, student.attention.q_proj.weight + 1.0)
    # a parameter replaced (load_state_dict(assign=True)) is read from where it now is
    state = {k: v.clone() * 0 for k, v in student.state_dict().items()}
    copied.load_state_dict(state, assign=True)
    assert not attention.v_proj.weight.any() and not attention.v_proj.bias.any()


def test_an_attention_prepared_alone_is_its_twin():
    attention = _attention()
    twin = prepare(attention, POLICY)
    assert isinstance(twin, QuantMultiheadAttention) and twin.q_proj.weight_quantizer is not None


class OwnAttention(nn.MultiheadAttention):
    def forward(self, query, key, value, **kwargs):  # type: ignore[override]
        return super().forward(query, key, value, **kwargs)


def test_a_subclass_with_its_own_forward_stays_float_and_is_named():
    model = nn.Sequential()
    model.attention = OwnAttention(WIDTH, HEADS)
    model.head = nn.Linear(WIDTH, 3)
    with pytest.warns(UserWarning, match=r"attention \(OwnAttention\): subclass of "
                      r"nn\.MultiheadAttention with its own forward\(\)"):  # fmt: skip
        student = prepare(model, POLICY)
    assert type(student.attention) is OwnAttention


# ------------------------------------------------------------------------ deployment
#: ONNX Runtime against PyTorch. Every quantized layer, the projections included, is exact in
#: isolation (integer sums), but the attention's scores, softmax and weighted sum (and layer
#: norms) are float ops that each runtime sums in its own order. A last-bit difference there
#: can move an activation code of the next quantized layer by one step, and that step then
#: reaches the logits. Measured: the block below, every parametrisation, 0 (bit for bit); two
#: 64-wide blocks (``Deeper``) over 12 seeds x need_weights, 0 in 23 of 24, and 0.201 on 0.08%
#: of the logits (magnitude ~2.6) in one (seed 1, need_weights=False: scaled_dot_product_
#: attention, which PyTorch runs as a fused kernel). The tolerance: at most this difference ...
ORT_TOLERANCE = 0.5
#: ... on at most this fraction of the logits
ORT_DIFFERING = 0.01


@pytest.mark.parametrize(
    ("options", "policy"),
    [
        ({}, "signed lsq"),
        ({"need_weights": False}, "signed lsq"),
        ({"causal": True}, "signed lsq"),
        ({}, "ewgs weights, lsq+ inputs"),
        ({"causal": True}, "dsq per channel"),
    ],
)
def test_export_runs_in_onnxruntime_and_matches(options, policy, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from sqakd.export import export_onnx, verify_onnx

    teacher, student = prepared_block(POLICIES[policy], **options)
    student.eval()
    data = tokens(64, seed=5)
    report = export_onnx(student, tmp_path / "m.onnx", example_inputs=data[:2])
    assert not report.float_fallbacks
    exported = {layer.name for layer in report.layers}
    assert {"attention.q_proj", "attention.k_proj", "attention.v_proj"} <= exported
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": data.numpy()})[0]
    with torch.no_grad():
        torch_out = student(data).numpy()
    difference = np.abs(onnx_out - torch_out)
    assert difference.max() <= ORT_TOLERANCE and (difference > 0).mean() <= ORT_DIFFERING
    verified = verify_onnx(tmp_path / "m.onnx", student, data, per_layer=True, class_dim=-1)
    assert verified.passed
    # every quantized layer, the projections included, is exact on the input PyTorch gave it
    assert set(verified.per_layer_mismatch) == {n for n, _ in quantized_layers(student)}
    assert all(v == 0.0 for v in verified.per_layer.values())


def test_packed_attention_replaces_in_proj_weight_and_loads_exactly(tmp_path):
    from safetensors import safe_open

    from sqakd.export.packing import load_packed, save_packed

    _, student = prepared_block()
    student.eval()
    save_packed(student, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "attention.in_proj_weight" not in keys and "attention.out_proj.weight" not in keys
    assert {"attention.q_proj.weight.codes", "attention.out_proj.weight.codes"} <= keys
    fresh = prepare(Block(), POLICY).eval()
    load_packed(fresh, tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), student(tokens()))


class Deeper(nn.Module):
    """An embedding, two (attention, layer norm, feed-forward) blocks and a linear head."""

    class Layer(nn.Module):
        def __init__(self, width: int, heads: int) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
            self.norm = nn.LayerNorm(width)
            self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.norm(x + self.attention(x, x, x, need_weights=False)[0])
            return x + self.down(torch.relu(self.up(x)))

    def __init__(self, width: int = 64, heads: int = 8, vocabulary: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.blocks = nn.Sequential(self.Layer(width, heads), self.Layer(width, heads))
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


def test_a_deeper_transformer_differs_in_onnxruntime_only_through_its_float_attention(tmp_path):
    """The one measured case (see ORT_TOLERANCE) where ONNX Runtime and PyTorch differ: every
    quantized layer is exact on the input PyTorch gave it; the logits differ on a few values."""
    pytest.importorskip("onnxruntime")
    from sqakd.export import export_onnx, verify_onnx

    torch.manual_seed(1)
    policy = QuantPolicy(**{**POLICY.model_dump(), "embeddings": True})
    student = prepare(Deeper().eval(), policy)
    data = torch.randint(0, 50, (64, 16))
    calibrate(student, [data])
    student.eval()
    export_onnx(student, tmp_path / "m.onnx", example_inputs=data[:2])
    report = verify_onnx(tmp_path / "m.onnx", student, data, per_layer=True, class_dim=-1)
    assert len(report.per_layer) == 14  # embedding, 2 x (4 projections, up, down), head
    assert all(v == 0.0 for v in report.per_layer.values())
    assert report.max_abs_diff <= ORT_TOLERANCE and report.agreement >= 1 - ORT_DIFFERING


class Encoder(nn.Module):
    """Token ids -> (N, T, V) logits through PyTorch's own nn.TransformerEncoder (two layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(WIDTH, VOCABULARY)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens), src_key_padding_mask=padding))


def test_transformer_encoder_layers_run_their_quantized_layers_in_inference(tmp_path):
    """nn.TransformerEncoderLayer's fused inference kernel reads the float weights directly;
    prepare() turns it off where quantized layers are inside, so calibration and inference go
    through them. The layers sit in a ModuleList (no scope of its own in the ONNX graph): each
    is still found and checked in isolation."""
    torch.manual_seed(0)
    teacher = Encoder().eval()
    student = prepare(teacher, POLICY)
    kinds = [type(m).__name__ for _, m in quantized_layers(student)]
    assert kinds.count("AttentionProjection") == 6 and kinds.count("QuantLinear") == 2 * 3 + 1
    data = tokens()
    padding = torch.zeros(data.shape, dtype=torch.bool)
    padding[0, -2:] = True
    calibrate(student, [data])  # eval, no autograd: the fused kernel would skip every quantizer
    assert all(bool(layer.calibrated) for _, layer in quantized_layers(student))
    student.eval()
    with torch.no_grad():
        inference = student(data, padding)
    torch.testing.assert_close(inference, student(data, padding).detach(), atol=1e-5, rtol=1e-5)
    set_quantization(student, False)
    with torch.no_grad():
        kept = ~padding  # the fused float kernel leaves padded positions at 0
        float_out = student(data, padding)[kept]
        torch.testing.assert_close(float_out, teacher(data, padding)[kept], atol=1e-6, rtol=1e-6)

    set_quantization(student, True)
    pytest.importorskip("onnxruntime")
    from sqakd.export import export_onnx, verify_onnx

    data = tokens(64, seed=5)
    export_onnx(student, tmp_path / "m.onnx", example_inputs=data[:2])
    report = verify_onnx(tmp_path / "m.onnx", student, data, per_layer=True, class_dim=-1)
    assert set(report.per_layer) == {name for name, _ in quantized_layers(student)}
    assert all(v == 0.0 for v in report.per_layer.values())
    assert report.max_abs_diff <= ORT_TOLERANCE and report.agreement >= 1 - ORT_DIFFERING

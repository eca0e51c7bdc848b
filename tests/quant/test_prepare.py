"""prepare()/plan()/describe() on real architectures: a ResNet (resnet20), a VGG (vgg8) and a
network with depthwise convolutions (mobilenetv2)."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from sqakd.models import build_model, load_weights
from sqakd.quant import (
    QuantConv2d,
    QuantizedLayer,
    QuantLinear,
    QuantPolicy,
    available_quantizers,
    describe,
    plan,
    prepare,
    quantized_layers,
    quantizer_parameters,
    set_quantization,
)
from sqakd.quant.float64_sums import Float64SumConv2d

ARCHITECTURES = ["resnet20", "vgg8", "mobilenetv2"]
METHODS = [m for m in ("ewgs", "ste", "lsq") if m in available_quantizers()]
#: one override pattern per architecture, matching a block of layers deep in the network
DEEP_PATTERN = {"resnet20": "layer3.*", "vgg8": "layer2.*", "mobilenetv2": "features.1?.*"}


def float_model(name: str) -> nn.Module:
    """A float model with batch-norm statistics of real magnitude (those of one random batch), so
    that its eval-mode activations look like a trained teacher's rather than vanish."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch gives that batch's statistics
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))
    return model.eval()


def images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def weighted_names(model: nn.Module) -> list[str]:
    """Names of every nn.Conv2d / nn.Linear, found independently of prepare()."""
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


@pytest.fixture(params=ARCHITECTURES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("method", METHODS)
def test_prepared_model_runs_with_unchanged_output_shape(name: str, method: str):
    model = float_model(name)
    student = prepare(model, QuantPolicy(method=method, weight_bits=2, act_bits=2)).eval()
    with torch.no_grad():
        expected, got = model(images()), student(images())
    assert got.shape == expected.shape == (4, 10)
    assert torch.isfinite(got).all()
    assert not torch.allclose(got, expected)  # 2-bit weights and activations change the logits
    # the original is untouched: still plain float layers
    assert not any(isinstance(m, QuantizedLayer) for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_default_plan_keeps_first_and_last_in_float_and_quantizes_every_other_layer(
    name: str, method: str
):
    model = float_model(name)
    names = weighted_names(model)
    policy = QuantPolicy(method=method, weight_bits=3, act_bits=4)
    rows = {row.name: row for row in plan(model, policy)}
    assert list(rows) == names
    first, last = names[0], names[-1]
    for layer_name, row in rows.items():
        if layer_name in (first, last):
            assert (row.weight_bits, row.act_bits, row.quantized) == (32, 32, False)
            assert row.note == "first/last layer kept in float"
        else:
            assert (row.weight_method, row.act_method) == (method, method)
            assert (row.weight_bits, row.act_bits, row.quantized) == (3, 4, True)
    assert type(model.get_submodule(last)) is nn.Linear

    student = prepare(model, policy)
    # still a float nn.Conv2d; in inference it sums in float64, as the exported graph does
    assert type(student.get_submodule(first)) is Float64SumConv2d
    assert type(student.get_submodule(last)) is nn.Linear
    layers = dict(quantized_layers(student))
    assert set(layers) == set(names) - {first, last}
    for layer in layers.values():
        assert layer.weight_quantizer.method == layer.act_quantizer.method == method
        assert (layer.weight_quantizer.bits, layer.act_quantizer.bits) == (3, 4)
        assert layer.weight_quantizer.role == "weight"
        assert layer.act_quantizer.role == "activation"
    # describe() of the prepared model reports the same decisions
    described = {r.name: (r.weight_bits, r.act_bits) for r in describe(student)}
    assert described == {n: (r.weight_bits, r.act_bits) for n, r in rows.items()}


def test_depthwise_convolutions_are_quantized_with_their_groups():
    student = prepare(float_model("mobilenetv2"), QuantPolicy(method="ewgs"))
    depthwise = [m for _, m in quantized_layers(student) if m.groups > 1]
    assert len(depthwise) == 17
    assert all(isinstance(m, QuantConv2d) and m.groups == m.in_channels for m in depthwise)


def test_plan_table_is_readable(name: str):
    model = float_model(name)
    table = str(plan(model, QuantPolicy(method="ewgs", weight_bits=2, act_bits=2)))
    lines = table.splitlines()
    assert lines[0].split() == [
        "layer",
        "type",
        "shape",
        "method",
        "W",
        "bits",
        "A",
        "bits",
        "note",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(weighted_names(model))
    first, *middle, last = lines[2:]
    assert first.split()[:6] == [
        weighted_names(model)[0],
        "Conv2d",
        first.split()[2],
        "-",
        "float",
        "float",
    ]
    assert last.split()[1] == "Linear" and "float" in last
    assert all(line.split()[3:6] == ["ewgs", "2", "2"] for line in middle)


@pytest.mark.parametrize("method", METHODS)
def test_first_last_8bit_and_same(name: str, method: str):
    model = float_model(name)
    names = weighted_names(model)
    edges = {names[0], names[-1]}
    eight = {
        r.name: r
        for r in plan(
            model, QuantPolicy(method=method, first_last="8bit", weight_bits=2, act_bits=2)
        )
    }
    same = {
        r.name: r
        for r in plan(
            model, QuantPolicy(method=method, first_last="same", weight_bits=2, act_bits=2)
        )
    }
    for layer_name in names:
        bits = (8, 8) if layer_name in edges else (2, 2)
        assert (eight[layer_name].weight_bits, eight[layer_name].act_bits) == bits
        assert (same[layer_name].weight_bits, same[layer_name].act_bits) == (2, 2)
    student = prepare(
        model, QuantPolicy(method=method, first_last="8bit", weight_bits=2, act_bits=2)
    )
    assert isinstance(student.get_submodule(names[0]), QuantConv2d)
    assert isinstance(student.get_submodule(names[-1]), QuantLinear)
    assert student.get_submodule(names[-1]).weight_quantizer.bits == 8


def test_override_by_name_pattern(name: str):
    model = float_model(name)
    pattern = DEEP_PATTERN[name]
    policy = QuantPolicy(
        method="ewgs", weight_bits=4, act_bits=4, overrides={pattern: {"weight_bits": 2}}
    )
    names = weighted_names(model)
    matched = {n for n in names[1:-1] if fnmatch.fnmatchcase(n, pattern)}
    assert 0 < len(matched) < len(names) - 2
    student = prepare(model, policy)
    for layer_name, layer in quantized_layers(student):
        weight_bits = 2 if layer_name in matched else 4
        assert (layer.weight_quantizer.bits, layer.act_quantizer.bits) == (weight_bits, 4)
    notes = {r.name: r.note for r in plan(model, policy)}
    assert all(notes[n] == f"override {pattern!r}" for n in matched)


def test_later_overrides_win_and_can_reach_the_edges():
    model = float_model("resnet20")
    policy = QuantPolicy(
        method="ewgs",
        overrides={
            "layer3.*": {"weight_bits": 2, "act_method": "ste"},
            "layer3.2.*": {"weight_bits": 1},
            "fc": {"weight_bits": 8, "act_bits": 8},
        },
    )
    rows = {r.name: r for r in plan(model, policy)}
    assert (rows["layer3.0.conv1"].weight_bits, rows["layer3.0.conv1"].act_method) == (2, "ste")
    assert (rows["layer3.2.conv2"].weight_bits, rows["layer3.2.conv2"].act_method) == (1, "ste")
    assert (rows["fc"].weight_bits, rows["fc"].act_bits) == (8, 8)  # beats first_last="float"
    assert rows["conv1"].weight_bits == 32
    student = prepare(model, policy)
    assert student.layer3[0].conv1.act_quantizer.method == "ste"
    assert student.layer3[0].conv1.weight_quantizer.method == "ewgs"
    assert "W:ewgs A:ste" in str(plan(model, policy))


def test_per_channel_weights():
    student = prepare(float_model("vgg8"), QuantPolicy(method="ewgs", per_channel_weights=True))
    for _, layer in quantized_layers(student):
        assert layer.weight_quantizer.per_channel and not layer.act_quantizer.per_channel


def test_float_policy_gives_the_original_outputs(name: str):
    model = float_model(name)
    student = prepare(model, QuantPolicy(method="ewgs", weight_bits=32, act_bits=32))
    assert not quantized_layers(student)
    assert all(not r.quantized for r in describe(student))
    with torch.no_grad():
        assert torch.equal(student(images()), model(images()))


@pytest.mark.parametrize("method", METHODS)
def test_switching_quantization_off_gives_the_original_outputs(name: str, method: str):
    model = float_model(name)
    student = prepare(model, QuantPolicy(method=method, weight_bits=2, act_bits=2)).eval()
    with torch.no_grad():
        quantized = student(images())  # calibrates every quantizer on this batch
        set_quantization(student, False)
        assert torch.equal(student(images()), model(images()))
        set_quantization(student, True)
        assert torch.equal(student(images()), quantized)
    assert not torch.allclose(quantized, model(images()))


def test_float_state_dict_loads_and_parameter_names_are_kept(name: str):
    model = float_model(name)
    student = prepare(model, QuantPolicy(method="ewgs", weight_bits=2, act_bits=2))
    float_names = {n for n, _ in model.named_parameters()}
    student_names = {n for n, _ in student.named_parameters()}
    assert float_names <= student_names
    quantizer_ids = {id(p) for p in quantizer_parameters(student)}
    extra = [p for n, p in student.named_parameters() if n not in float_names]
    assert extra and all(id(p) in quantizer_ids for p in extra)
    assert all("_quantizer." in n for n in student_names - float_names)

    # another float model's weights load by name; only quantizer keys are missing
    torch.manual_seed(7)
    other = build_model(name, num_classes=10).eval()
    with torch.no_grad():
        for tensor in other.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.1)
    result = student.load_state_dict(other.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys
    assert all("_quantizer." in k or k.endswith(".calibrated") for k in result.missing_keys)
    set_quantization(student, False)
    with torch.no_grad():
        assert torch.equal(student.eval()(images()), other(images()))

    # the same through sqakd.models.load_weights (strict=False for the quantizer keys)
    fresh = prepare(float_model(name), QuantPolicy(method="ewgs", weight_bits=2, act_bits=2))
    load_weights(fresh, other.state_dict(), strict=False)
    set_quantization(fresh, False)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images()), other(images()))


def test_prepared_state_dict_round_trips_into_a_fresh_prepared_model():
    policy = QuantPolicy(method="ewgs", weight_bits=2, act_bits=2)
    student = prepare(float_model("resnet20"), policy).eval()
    with torch.no_grad():
        expected = student(images())
    twin = prepare(build_model("resnet20", num_classes=10), policy).eval()
    load_weights(twin, student.state_dict())  # strict: quantizer ranges included
    with torch.no_grad():
        assert torch.equal(twin(images()), expected)


def test_prepare_copies_unless_inplace():
    model = float_model("resnet20")
    student = prepare(model, QuantPolicy(method="ewgs"))
    assert student is not model
    assert student.layer1[0].conv1.weight is not model.layer1[0].conv1.weight
    same = prepare(model, QuantPolicy(method="ewgs"), inplace=True)
    assert same is model and isinstance(model.layer1[0].conv1, QuantConv2d)


# ------------------------------------------------------------------------------------ bad input
def test_a_pattern_that_matches_no_layer(name: str):
    model = float_model(name)
    with pytest.raises(ValueError, match="'layer9.\\*' matches no quantizable layer") as error:
        prepare(model, QuantPolicy(overrides={"layer9.*": {"weight_bits": 2}}))
    assert weighted_names(model)[0] in str(error.value)


def test_unknown_method():
    # refused when the policy is built, before any model is touched
    for settings in (
        {"method": "lsqq"},
        {"act_method": "nope"},
        {"overrides": {"layer1.*": {"method": "nope"}}},
    ):
        with pytest.raises(ValueError, match="unknown quantization method") as error:
            QuantPolicy(**settings)
        assert "ewgs" in str(error.value)


@pytest.mark.parametrize(
    "settings",
    [{"weight_bits": 9}, {"act_bits": 0}, {"overrides": {"layer1.*": {"weight_bits": 9}}}],
)
def test_bits_out_of_range(settings: dict):
    with pytest.raises(ValueError, match="bits must be 1..8, or 32"):
        QuantPolicy(**settings)


def test_a_model_without_a_quantizable_layer_warns():
    model = nn.Sequential(nn.Embedding(10, 4), nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.warns(
        UserWarning, match=r"no layer is quantized \(layers with weights: Embedding\)"
    ):
        student = prepare(model)
    assert type(student[0]) is nn.Embedding
    assert str(describe(student)).startswith("WARNING: no layer is quantized")


class Conv2dSame(nn.Conv2d):
    """timm-style: a Conv2d subclass with its own forward (pads like TensorFlow's SAME)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


class WithOwnForward(nn.Module):
    """A model with a layer prepare() cannot swap: a subclass with its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.same = Conv2dSame(8, 8, 2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.body(torch.relu(self.stem(x)))))
        return self.head(self.same(x).mean(dim=(2, 3)))


def test_a_subclass_with_its_own_forward_is_left_as_is_listed_and_warned():
    model = WithOwnForward().eval()
    rows = {r.name: r for r in plan(model, QuantPolicy(method="ewgs"))}
    assert set(rows) == {"stem", "body", "same", "head"}  # BN is not listed
    assert rows["same"].kind == "Conv2dSame" and not rows["same"].supported
    assert rows["same"].note.startswith(
        "subclass of nn.Conv2d with its own forward(), kept in float"
    )
    assert rows["same"].shape == (8, 8, 2, 2)
    assert rows["body"].quantized and not rows["stem"].quantized and not rows["head"].quantized

    with pytest.warns(
        UserWarning, match=r"1 layer\(s\) with weights stay in float: same \(Conv2dSame\)"
    ):
        student = prepare(model, QuantPolicy(method="ewgs"))
    student.eval()
    assert type(student.same) is Conv2dSame
    assert isinstance(student.body, QuantConv2d)
    assert "own forward()" in str(describe(student))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert student(x).shape == (2, 5)

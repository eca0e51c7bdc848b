"""Packed low-bit files: bit packing by hand, bit-exact round trips, sizes, and bad input."""

import json

import pytest
import torch
from export_cases import CASES, WEIGHT_ONLY, quantize
from safetensors import safe_open

from sqakd.export import load_packed, pack_bits, packed_size, save_packed, unpack_bits
from sqakd.quant import QuantPolicy, prepare, quantized_layers
from sqakd.quant.deployed import weight_codes

# a round trip that only restores the codes warns; here every round trip must be exact
pytestmark = pytest.mark.filterwarnings("error:.*codes are restored:UserWarning")


def test_two_four_bit_codes_share_a_byte_low_nibble_first():
    assert pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]


def test_three_bit_codes_straddle_byte_boundaries():
    # 5 = 101, 3 = 011, 7 = 111, least significant bit first: stream 1 0 1 | 1 1 0 | 1 1 1
    # byte 0 = bits 0..7 = 1,0,1,1,1,0,1,1 -> 1 + 4 + 8 + 16 + 64 + 128 = 221; byte 1 = 1
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [221, 1]


def test_one_bit_codes_fill_a_byte_eight_at_a_time():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [129, 1]


@pytest.mark.parametrize("width", range(1, 9))
def test_pack_unpack_round_trip(width):
    values = torch.randint(0, 2**width, (1001,), generator=torch.Generator().manual_seed(width))
    packed = pack_bits(values, width)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * width // 8)
    assert torch.equal(unpack_bits(packed, width, 1001), values)


def test_values_out_of_range_are_refused():
    with pytest.raises(ValueError, match="0..15"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.tensor([1]), 9)


def policy_of(method, weight_bits, act_bits, **extra):
    weight_method, act_method = WEIGHT_ONLY.get(method, (method, method))[:2]
    return QuantPolicy(
        method=weight_method,
        act_method=act_method,
        weight_bits=weight_bits,
        act_bits=act_bits,
        **extra,
    )


@pytest.mark.parametrize(("method", "weight_bits", "act_bits"), CASES)
def test_round_trip_is_bit_exact(small_net, cifar_batch, tmp_path, method, weight_bits, act_bits):
    images, _ = cifar_batch
    model = quantize(small_net(), images, method, weight_bits, act_bits, first_last="same")
    with torch.no_grad():
        expected = model(images)
    save_packed(model, tmp_path / "m.safetensors")
    fresh = prepare(small_net(), policy_of(method, weight_bits, act_bits, first_last="same"))
    load_packed(fresh, tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images), expected)
    for (_, old), (_, new) in zip(quantized_layers(model), quantized_layers(fresh)):
        old_codes, _ = weight_codes(old.weight_quantizer, old.weight)
        new_codes, _ = weight_codes(new.weight_quantizer, new.weight)
        with torch.no_grad():  # the values each layer computes with in eval mode
            assert torch.equal(new.quantized_weight(), old.quantized_weight())
        assert torch.equal(new_codes, old_codes)


@pytest.mark.parametrize(
    ("method", "bits"), [("binary", 1), ("ternary", 2), ("faqd4", 4), ("minmax", 4)]
)
def test_pinned_weight_of_statistic_quantizers_is_dropped_once_the_weight_changes(
    small_net, cifar_batch, tmp_path, method, bits
):
    # binary/ternary/minmax recompute mean|w| or min/max from the weight: the loaded layers pin
    # the exact saved values, and a weight update must bring back the live quantizer
    images, _ = cifar_batch
    model = quantize(small_net(), images, method, bits, 4, first_last="same")
    save_packed(model, tmp_path / "m.safetensors")
    fresh = load_packed(
        prepare(small_net(), policy_of(method, bits, 4, first_last="same")),
        tmp_path / "m.safetensors",
    )
    _, layer = quantized_layers(fresh)[1]
    pinned = layer.quantized_weight()
    assert torch.equal(pinned, quantized_layers(model)[1][1].quantized_weight())
    with torch.no_grad():
        layer.weight.mul_(3.0)  # in place, like an optimizer step
    live = layer.quantized_weight()
    assert layer._pinned_weight is None
    assert torch.equal(live, layer.weight_quantizer(layer.weight))
    assert not torch.allclose(live, pinned)


@pytest.mark.parametrize("method", ["ewgs", "lsq", "dorefa"])
def test_per_channel_round_trip_is_bit_exact(small_net, cifar_batch, tmp_path, method):
    images, _ = cifar_batch
    extra = {"first_last": "same", "per_channel_weights": True}
    model = quantize(small_net(), images, method, 3, 4, **extra)
    with torch.no_grad():
        expected = model(images)
    save_packed(model, tmp_path / "m.safetensors")
    fresh = load_packed(
        prepare(small_net(), policy_of(method, 3, 4, **extra)), tmp_path / "m.safetensors"
    )
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), expected)


def test_file_holds_packed_codes_grids_and_metadata(small_net, cifar_batch, tmp_path):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "lsq", 4, 4)  # first and last layers stay float
    report = save_packed(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        records = json.loads(handle.metadata()["sqakd"])["layers"]
        codes = handle.get_tensor("depthwise.0.weight.codes")
    assert set(records) == {"depthwise.0.weight", "pointwise.0.weight"}
    assert records["depthwise.0.weight"] | {"sha256": ""} == {
        "method": "lsq", "bits": 4, "width": 4, "qmin": -8, "qmax": 7,
        "shape": [16, 1, 3, 3], "axis": None, "sha256": "",
    }  # fmt: skip
    assert codes.dtype == torch.uint8 and codes.numel() == 16 * 9 // 2
    assert "stem.0.weight" in keys and "head.weight" in keys  # float layers as float tensors
    assert "depthwise.0.weight" not in keys and "depthwise.0.weight.scale" in keys
    assert "stem.1.running_mean" in keys and "pointwise.0.bias" in keys
    stored = sum(t.numel() * t.element_size() for t in _tensors(tmp_path / "m.safetensors"))
    assert report.packed_bytes == stored


def _tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return [handle.get_tensor(key) for key in handle.keys()]


def test_packed_size_counts_bytes(small_net, cifar_batch):
    images, _ = cifar_batch
    model = quantize(small_net(), images, "lsq", 4, 4, first_last="same")
    size = packed_size(model)
    weights = sum(layer.weight.numel() for _, layer in quantized_layers(model))
    assert size.quantized_weight_float32_bytes == 4 * weights
    assert size.quantized_weight_packed_bytes == sum(
        -(-layer.weight.numel() * 4 // 8) for _, layer in quantized_layers(model)
    )
    assert size.weight_ratio == pytest.approx(8.0, rel=0.01)
    float_bytes = sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size())
        for t in small_net().state_dict().values()
    )
    assert (
        size.float32_bytes == float_bytes and size.ratio == size.float32_bytes / size.packed_bytes
    )


# ----------------------------------------------------------------------------------- errors
def test_float_model_is_refused(small_net, tmp_path):
    with pytest.raises(ValueError, match="sqakd quantize.*sqakd.prepare"):
        save_packed(small_net(), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="sqakd.prepare"):
        packed_size(small_net())


def test_missing_folder_and_file_are_refused(small_net, cifar_batch, tmp_path):
    model = quantize(small_net(), cifar_batch[0], "lsq", 4, 4)
    with pytest.raises(ValueError, match="does not exist"):
        save_packed(model, tmp_path / "missing" / "m.safetensors")
    with pytest.raises(ValueError, match="not found"):
        load_packed(model, tmp_path / "m.safetensors")


def test_loading_into_a_differently_prepared_model_is_refused(small_net, cifar_batch, tmp_path):
    model = quantize(small_net(), cifar_batch[0], "lsq", 4, 4)
    save_packed(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="packed as lsq W4 but the model has lsq W2"):
        load_packed(
            prepare(small_net(), QuantPolicy(method="lsq", weight_bits=2)),
            tmp_path / "m.safetensors",
        )
    # same layers and bits, other quantizer parameters (LSQ+ activations add an offset)
    other = prepare(small_net(), QuantPolicy(method="lsq", act_method="lsq+"))
    with pytest.raises(ValueError, match="does not match the model"):
        load_packed(other, tmp_path / "m.safetensors")


def test_a_file_of_another_format_is_refused(tmp_path, small_net, cifar_batch):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    model = quantize(small_net(), cifar_batch[0], "lsq", 4, 4)
    with pytest.raises(ValueError, match="not a sqakd.packed/1 file"):
        load_packed(model, tmp_path / "other.safetensors")


# ------------------------------------------------------------------------------ real models
@pytest.mark.parametrize(
    ("name", "method"), [("resnet20", "ewgs"), ("resnet20", "lsq"), ("mobilenetv2", "dorefa")]
)
def test_real_model_round_trip_is_bit_exact(cifar_batch, tmp_path, name, method):
    from sqakd.models import build_model

    images, _ = cifar_batch
    torch.manual_seed(0)
    model = quantize(build_model(name, num_classes=10), images, method, 4, 4)
    with torch.no_grad():
        expected = model(images[:64])
    save_packed(model, tmp_path / "m.safetensors")
    fresh = prepare(build_model(name, num_classes=10), policy_of(method, 4, 4))
    load_packed(fresh, tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(fresh(images[:64]), expected)


def test_four_bit_resnet20_is_at_most_a_seventh_of_float(cifar_batch, tmp_path):
    from sqakd.models import build_model

    images, _ = cifar_batch
    model = quantize(
        build_model("resnet20", num_classes=10), images, "ewgs", 4, 4
    )  # first/last float
    size = save_packed(model, tmp_path / "m.safetensors")
    float_state = build_model("resnet20", num_classes=10).state_dict().values()
    assert size.float32_bytes == sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in float_state
    )
    # measured: 1,084,544 -> 149,822 bytes (7.24x); the 4-bit weights alone are exactly 8x
    assert size.packed_bytes * 7 <= size.float32_bytes
    assert size.weight_ratio == pytest.approx(8.0)

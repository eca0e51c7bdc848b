"""Float64SumConv2d: the first layer kept in float sums in float64 in inference (so an exported
graph that does the same agrees bit for bit), and is PyTorch's own convolution otherwise."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.quant import QuantPolicy, describe, prepare, set_quantization
from sqakd.quant.float64_sums import Float64SumConv2d, Float64SumConvExport

SHAPES = [
    dict(padding=1),
    dict(stride=2, padding=1, bias=False),
    dict(padding=2, dilation=2),
    dict(padding=1, padding_mode="reflect"),
]


def conv_pair(**options):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, **options)
    return conv, Float64SumConv2d.from_float(conv)


@pytest.mark.parametrize("options", SHAPES)
def test_inference_is_the_float64_sum_rounded_once(options):
    """``float32(sum of the products in float64) + bias``, and not the float32 convolution."""
    conv, twin = conv_pair(**options)
    twin.eval()
    x = torch.randn(4, 3, 11, 11)
    padded, padding = x, conv.padding
    if conv.padding_mode != "zeros":
        padded, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode="reflect"), 0
    with torch.no_grad():
        sums = F.conv2d(padded.double(), conv.weight.double(), None, conv.stride, padding, conv.dilation)  # fmt: skip
        expected = sums.float()
        if conv.bias is not None:
            expected = expected + conv.bias.reshape(1, -1, 1, 1)
        assert torch.equal(twin(x), expected)
        assert not torch.equal(twin(x), conv(x))


@pytest.mark.parametrize("options", SHAPES)
def test_training_autograd_and_quantization_off_are_pytorchs_convolution(options):
    conv, twin = conv_pair(**options)
    x = torch.randn(4, 3, 11, 11, requires_grad=True)
    assert torch.equal(twin(x), conv(x))  # training mode
    twin.eval(), conv.eval()
    assert torch.equal(twin(x), conv(x))  # eval with autograd on
    twin.quantization_enabled = False
    with torch.no_grad():
        assert torch.equal(twin(x), conv(x))


@pytest.mark.parametrize("options", SHAPES)
def test_the_export_form_computes_the_same_bits(options):
    """im2col + float64 matrix product (the graph's form) against the float64 convolution: two
    summation orders, the same float32 after rounding."""
    _, twin = conv_pair(**options)
    twin.eval()
    x = torch.randn(4, 3, 13, 13)
    with torch.no_grad():
        assert torch.equal(Float64SumConvExport(twin)(x), twin(x))


def test_float64_beats_float32_summation_order_noise():
    """Why: the float32 convolution's result depends on summation order (here, the order of the
    input channels), the float64-summed one does not."""
    torch.manual_seed(0)
    conv = Float64SumConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1)).eval()
    order = torch.randperm(16)
    x = torch.randn(8, 16, 16, 16)
    with torch.no_grad():
        permuted = F.conv2d(x[:, order].double(), conv.weight[:, order].double(), None, 1, 1)
        permuted = permuted.float() + conv.bias.reshape(1, -1, 1, 1)
        assert torch.equal(conv(x), permuted)
        as_float32 = F.conv2d(x, conv.weight, conv.bias, 1, 1)
        reordered = F.conv2d(x[:, order], conv.weight[:, order], conv.bias, 1, 1)
    assert not torch.equal(as_float32, reordered)


def test_prepare_swaps_only_a_float_first_convolution():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 2),
    )  # fmt: skip
    prepared = prepare(model, QuantPolicy(method="lsq"))
    assert type(prepared[0]) is Float64SumConv2d and type(prepared[4]) is nn.Linear
    assert prepared[0].weight is not model[0].weight  # a copy, parameter names kept
    assert set(prepared.state_dict()) >= set(model.state_dict())
    rows = {row.name: row for row in describe(prepared)}  # a float layer, not an unsupported one
    assert rows["0"].note == "float, summed in float64 in inference" and not rows["0"].quantized
    assert "unsupported" not in str(describe(prepared))
    eight = prepare(model, QuantPolicy(method="lsq", first_last="8bit"))
    assert not any(isinstance(m, Float64SumConv2d) for m in eight.modules())
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3))
    assert type(prepare(grouped, QuantPolicy(method="lsq"))[0]) is nn.Conv2d
    set_quantization(prepared, False)
    assert prepared[0].quantization_enabled is False

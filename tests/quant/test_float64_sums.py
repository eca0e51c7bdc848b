"""Float64SumConv1d/2d/3d: the first layer kept in float sums in float64 in inference (so an
exported graph that does the same agrees bit for bit), and is PyTorch's own convolution
otherwise."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.quant import QuantPolicy, describe, prepare, set_quantization
from sqakd.quant.float64_sums import (
    FLOAT64_SUM_TWINS,
    Float64SumConv2d,
    Float64SumConv3d,
    Float64SumConvExport,
    can_sum_in_float64,
)

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


# ------------------------------------------------------------------------ Conv1d and Conv3d
NDIM_CASES = [
    (nn.Conv1d, (2, 3, 17), dict(padding=2)),
    (nn.Conv1d, (2, 3, 17), dict(stride=2, padding=1, dilation=2, bias=False)),
    (nn.Conv1d, (2, 3, 17), dict(padding=1, padding_mode="reflect")),
    (nn.Conv3d, (2, 2, 7, 6, 5), dict(padding=1)),
    (nn.Conv3d, (2, 2, 7, 6, 5), dict(stride=(2, 1, 2), padding=(1, 0, 2), dilation=(1, 2, 1))),
    (nn.Conv3d, (2, 2, 7, 6, 5), dict(padding=1, padding_mode="replicate", bias=False)),
]
NDIM_IDS = ["1d", "1d-strided", "1d-reflect", "3d", "3d-strided", "3d-replicate"]


def ndim_pair(float_type, shape, options):
    torch.manual_seed(0)
    conv = float_type(shape[1], 4, 3, **options)
    return conv, FLOAT64_SUM_TWINS[float_type].from_float(conv)


def brute_force_integer_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The convolution of integer-valued ``x`` and weight in int64, one kernel offset at a time
    (padding applied first as the layer does): exact, whatever the order."""
    spatial = x.dim() - 2
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    else:
        x = F.pad(x, [p for pad in reversed(conv.padding) for p in (pad, pad)])
    x, weight = x.round().long(), conv.weight.detach().round().long()
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    sizes = [(x.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(spatial)]  # fmt: skip
    out = torch.zeros(x.shape[0], weight.shape[0], *sizes, dtype=torch.long)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(
            slice(o * dilation[d], o * dilation[d] + stride[d] * (sizes[d] - 1) + 1, stride[d])
            for d, o in enumerate(offset)
        )
        window = x[(slice(None), slice(None), *index)]  # (N, C, *sizes)
        taps = weight[(slice(None), slice(None), *offset)]  # (O, C)
        out += (window.unsqueeze(1) * taps.reshape(*taps.shape, *[1] * spatial)).sum(dim=2)
    return out


@pytest.mark.parametrize(("float_type", "shape", "options"), NDIM_CASES, ids=NDIM_IDS)
def test_nd_inference_is_the_exact_integer_sum_rounded_once(float_type, shape, options):
    """Integer inputs and weights large enough that float32 sums are inexact (above 2**24):
    the float64 sums are exact, so the output is the brute-force int64 sum rounded once to
    float32, plus the bias."""
    conv, twin = ndim_pair(float_type, shape, options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-4096, 4097, conv.weight.shape, generator=generator))
    x = torch.randint(-4096, 4097, shape, generator=generator).float()
    twin.eval()
    expected = brute_force_integer_conv(conv, x)
    assert int(expected.abs().max()) > 2**24  # beyond float32's exact integers
    expected = expected.double().float()  # one rounding, from the exact sum
    if conv.bias is not None:
        expected = expected + conv.bias.detach().reshape(1, -1, *[1] * (x.dim() - 2))
    with torch.no_grad():
        assert torch.equal(twin(x), expected)
        assert torch.equal(Float64SumConvExport(twin)(x), expected)  # the graph's form


@pytest.mark.parametrize(("float_type", "shape", "options"), NDIM_CASES, ids=NDIM_IDS)
def test_nd_float_inputs_the_export_form_and_training(float_type, shape, options):
    conv, twin = ndim_pair(float_type, shape, options)
    x = torch.randn(*shape)
    assert torch.equal(twin(x), conv(x))  # training mode: PyTorch's convolution
    twin.eval(), conv.eval()
    with torch.no_grad():
        expected = conv._conv_forward(x.double(), conv.weight.double(), None).float()
        if conv.bias is not None:
            expected = expected + conv.bias.reshape(1, -1, *[1] * (x.dim() - 2))
        assert torch.equal(twin(x), expected)
        assert torch.equal(Float64SumConvExport(twin)(x), twin(x))
        twin.quantization_enabled = False
        assert torch.equal(twin(x), conv(x))


@pytest.mark.parametrize("float_type", [nn.Conv1d, nn.Conv3d])
def test_prepare_swaps_a_float_first_1d_or_3d_convolution(float_type):
    model = nn.Sequential(float_type(2, 4, 3, padding=1), nn.ReLU(), float_type(4, 4, 3),
                          nn.Flatten(), nn.LazyLinear(2))  # fmt: skip
    shape = (1, 2, 8) if float_type is nn.Conv1d else (1, 2, 5, 5, 5)
    model(torch.randn(*shape))  # materialise the lazy layer
    prepared = prepare(model, QuantPolicy(method="lsq"))
    assert type(prepared[0]) is FLOAT64_SUM_TWINS[float_type]
    rows = {row.name: row for row in describe(prepared)}
    assert rows["0"].note == "float, summed in float64 in inference"
    with pytest.raises(ValueError, match="wraps an ungrouped nn.Conv3d"):
        Float64SumConv3d.from_float(nn.Conv1d(2, 2, 3))
    assert not can_sum_in_float64(nn.ConvTranspose1d(2, 2, 3))

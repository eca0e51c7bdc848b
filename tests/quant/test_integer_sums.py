"""Integer sums (sqakd.quant.integer_sums): a quantized layer's op on integer codes, with the
exact extra terms that a fractional input zero point (a shift ``c``) and a fractional weight zero
point (an offset ``o`` per output channel) add. Checked against the op on the float values, by
hand at a padded border, for order independence, and in the layers that use it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sqakd.export.view import build_export_view
from sqakd.quant import QuantPolicy, calibrate, prepare, quantized_layers
from sqakd.quant.integer_sums import (
    IntegerWeight,
    expand_groups,
    integer_sums,
    sum_constants,
    window_kernel,
)


def conv_sums(x_codes, w_codes, x_scale, shift, weight, groups=1, padding=1):
    """integer_sums for a convolution, as QuantConv2d wires it."""
    constants = sum_constants(x_scale, shift, weight, 2)
    kernel = window_kernel(w_codes, groups)

    def op(x, w):
        return F.conv2d(x, w, padding=padding, groups=groups)

    def window(x):
        return expand_groups(op(x, kernel), w_codes.shape[0])

    return integer_sums(op, window, x_codes, w_codes, constants, None)


def test_a_padded_corner_by_hand():
    """One input channel [[1, 2], [3, 4]] (scale 0.5, shift 0.25: values 0.75, 1.25, 1.75,
    2.25), a 2x2 kernel [[1, -1], [2, 0]] (scale 0.5, offset 0.125: 0.625, -0.375, 1.125,
    0.125), padding 1. The top-left output sees only x[0, 0] under w[1, 1]: 0.75 * 0.125 =
    0.09375; a shift applied to the zero padding as well would add 0.25 * (0.625 - 0.375 +
    1.125) = 0.34375."""
    x_codes = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    w_codes = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])
    weight = IntegerWeight(w_codes, torch.tensor(0.5), torch.tensor([0.125]))
    out = conv_sums(x_codes, w_codes, torch.tensor(0.5), 0.25, weight)
    assert out.shape == (1, 1, 3, 3)
    assert out[0, 0, 0, 0].item() == 0.09375
    # the centre sees all four: 0.75*0.625 - 1.25*0.375 + 1.75*1.125 + 2.25*0.125
    assert out[0, 0, 1, 1].item() == pytest.approx(0.46875 - 0.46875 + 1.96875 + 0.28125)


@pytest.mark.parametrize(("groups", "in_channels", "out_channels"), [(1, 6, 5), (2, 6, 4), (6, 6, 6), (3, 3, 6)])  # fmt: skip
@pytest.mark.parametrize(("shift", "offset"), [(0.0, False), (0.3, False), (0.0, True), (-0.2, True)])  # fmt: skip
def test_equals_the_op_on_the_values(groups, in_channels, out_channels, shift, offset):
    """Grouped, depthwise and channel-multiplier convolutions, with and without each term,
    against the convolution of ``s X + c`` and ``t W + o`` in float64."""
    generator = torch.Generator().manual_seed(groups + in_channels)
    x_codes = torch.randint(0, 16, (2, in_channels, 7, 7), generator=generator).float()
    w_codes = torch.randint(-8, 8, (out_channels, in_channels // groups, 3, 3), generator=generator).float()  # fmt: skip
    x_scale, w_scale = torch.tensor(0.07), torch.rand(out_channels, generator=generator) + 0.1
    w_offset = (torch.rand(out_channels, generator=generator) - 0.5) * 0.1 if offset else None
    weight = IntegerWeight(w_codes, w_scale, w_offset)
    out = conv_sums(x_codes, w_codes, x_scale, shift, weight, groups)
    values = x_codes.double() * x_scale.double() + shift
    w_values = w_codes.double() * w_scale.double().reshape(-1, 1, 1, 1)
    if w_offset is not None:
        w_values = w_values + w_offset.double().reshape(-1, 1, 1, 1)
    expected = F.conv2d(values, w_values, padding=1, groups=groups)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_linear_with_a_sequence_dimension():
    x_codes = torch.randint(-5, 6, (2, 3, 8)).float()
    w_codes = torch.randint(-7, 8, (4, 8)).float()
    weight = IntegerWeight(w_codes, torch.tensor(0.1), torch.tensor(0.03))
    constants = sum_constants(torch.tensor(0.2), 0.05, weight, 0)
    kernel = window_kernel(w_codes)
    bias = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = integer_sums(F.linear, lambda x: F.linear(x, kernel), x_codes, w_codes, constants, bias)
    expected = F.linear(x_codes.double() * 0.2 + 0.05, w_codes.double() * 0.1 + 0.03, bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_result_does_not_depend_on_the_summation_order():
    """Permuting the input channels changes the order in which the convolution sums; on integer
    codes every partial sum is exact, so the output is bit for bit the same."""
    generator = torch.Generator().manual_seed(0)
    x_codes = torch.randint(0, 256, (1, 64, 9, 9), generator=generator).float()
    w_codes = torch.randint(-127, 128, (16, 64, 3, 3), generator=generator).float()
    weight = IntegerWeight(w_codes, torch.rand(16, generator=generator), torch.rand(16) * 0.01)
    order = torch.randperm(64, generator=generator)
    reordered = IntegerWeight(w_codes[:, order], weight.scale, weight.offset)
    out = conv_sums(x_codes, w_codes, torch.tensor(0.013), 0.37, weight)
    permuted = conv_sums(x_codes[:, order], w_codes[:, order], torch.tensor(0.013), 0.37, reordered)
    assert torch.equal(out, permuted)


def shifted_model(method: str) -> nn.Module:
    """A small conv net prepared with ``method`` at 4 bits, calibrated, then with every range's
    lower end (``lower``, ``offset``) moved by a fraction of a step: fractional zero points, as
    training leaves them."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
    )  # fmt: skip
    prepared = prepare(
        model, QuantPolicy(method=method, weight_bits=4, act_bits=4, first_last="same")
    )
    calibrate(prepared, [torch.randn(4, 3, 6, 6)])
    with torch.no_grad():
        for name, parameter in prepared.named_parameters():
            if name.endswith((".lower", ".offset")):
                parameter.add_(0.0137 * (1 + torch.rand_like(parameter)))
    return prepared.eval()


@pytest.mark.parametrize("method", ["dsq", "lsq+"])
def test_layers_with_fractional_zero_points_run_integer_sums(method):
    """Every layer has an integer form, the shifted ranges give input shifts (and, for DSQ,
    weight offsets), and the eval forward on codes equals the fake-quantized float forward."""
    model = shifted_model(method)
    x = torch.randn(5, 3, 6, 6)
    forms = [
        (layer.act_quantizer.deployed_integer(x), layer.integer_weight())
        for _, layer in quantized_layers(model)
    ]
    assert all(codes is not None and weight is not None for codes, weight in forms)
    assert all(codes.shift != 0 for codes, _ in forms)
    offsets = [weight.offset is not None for _, weight in forms]
    assert all(offsets) if method == "dsq" else not any(offsets)
    with torch.no_grad():
        integer = model(x)
    with torch.enable_grad():  # autograd on: the fake-quantized float forward
        fake = model(x).detach()
    torch.testing.assert_close(integer, fake, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["dsq", "lsq+"])
def test_the_export_view_computes_bit_for_bit_what_pytorch_computes(method):
    model = shifted_model(method)
    view, reports = build_export_view(model)
    notes = " ".join(note for report in reports for note in report.notes)
    assert "plus exact terms for the input shift" in notes
    if method == "dsq":
        assert "weight offset" in notes
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(view(x), model(x))


def test_a_linear_layer_on_a_sequence_runs_integer_sums():
    """A token sequence ``(batch, tokens, features)`` with per-channel weights: the per-channel
    constants and the bias broadcast over the last axis, not axis 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    policy = QuantPolicy(
        method="lsq", weight_bits=4, act_bits=4, first_last="same", per_channel_weights=True
    )
    prepared = prepare(model, policy)
    x = torch.randn(2, 7, 8)
    calibrate(prepared, [x])
    prepared.eval()
    layer = quantized_layers(prepared)[0][1]
    assert layer.integer_weight().scale.shape == (5,)
    with torch.no_grad():
        assert layer.integer_forward(x) is not None
        integer = prepared(x)
    with torch.enable_grad():
        fake = prepared(x).detach()
    assert integer.shape == (2, 7, 3)
    torch.testing.assert_close(integer, fake, rtol=1e-5, atol=1e-5)

"""DoReFa-Net quantizer: forward values, STE gradients, grid, state, and bad input."""

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.methods.dorefa import DoReFaQuantizer

# tanh(w) = [-0.8 -0.3 0.1 0.5 0.8]; max|tanh| = 0.8 -> w_t = tanh / 1.6 + 0.5
TANH = torch.tensor([-0.8, -0.3, 0.1, 0.5, 0.8])
WEIGHT_X = torch.atanh(TANH)
MEAN_ABS = 0.6312771  # (2 atanh .8 + atanh .3 + atanh .1 + atanh .5) / 5
WEIGHT_EXPECTED = {
    1: [-MEAN_ABS, -MEAN_ABS, MEAN_ABS, MEAN_ABS, MEAN_ABS],
    2: [-1, -1 / 3, 1 / 3, 1 / 3, 1],  # w_t * 3 = 0 .9375 1.6875 2.4375 3
    4: [-1, -1 / 3, 1 / 15, 9 / 15, 1],  # w_t * 15 = 0 4.6875 8.4375 12.1875 15
    8: [-1, 2 * 80 / 255 - 1, 2 * 143 / 255 - 1, 2 * 207 / 255 - 1, 1],  # 79.6875 143.4375 207.1875
}
ACT_X = torch.tensor([-0.5, 0.15, 0.45, 0.75, 1.2])
ACT_EXPECTED = {
    1: [0.0, 0.0, 0.0, 1.0, 1.0],
    2: [0, 0, 1 / 3, 2 / 3, 1],  # x * 3 = 0 .45 1.35 2.25 3
    4: [0, 2 / 15, 7 / 15, 11 / 15, 1],  # x * 15 = 0 2.25 6.75 11.25 15
    8: [0, 38 / 255, 115 / 255, 191 / 255, 1],  # x * 255 = 0 38.25 114.75 191.25 255
}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weight_forward_matches_hand_computation(bits):
    out = DoReFaQuantizer(bits, "weight")(WEIGHT_X)
    torch.testing.assert_close(out, torch.tensor(WEIGHT_EXPECTED[bits]))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_forward_matches_hand_computation(bits):
    out = DoReFaQuantizer(bits, "activation")(ACT_X)
    torch.testing.assert_close(out, torch.tensor(ACT_EXPECTED[bits]))


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_at_most_two_to_the_bits_levels(bits, role):
    torch.manual_seed(0)
    x = torch.randn(20000) if role == "weight" else torch.rand(20000) * 1.2
    levels = DoReFaQuantizer(bits, role)(x).unique().numel()
    assert levels <= 2**bits
    if bits <= 4:
        assert levels == 2**bits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_is_idempotent(bits):
    torch.manual_seed(1)
    q = DoReFaQuantizer(bits, "activation")
    once = q(torch.randn(1000))
    torch.testing.assert_close(q(once), once, rtol=0, atol=0)
    codes = q.codes(once)
    torch.testing.assert_close(q.codes(q.grid().dequantize(codes)), codes)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_grid_is_idempotent(bits):
    """Weights land in [-1, 1] (or {-E, E}) whatever their input range, so the forward is not
    idempotent; the grid is: each code's value maps back to that code."""
    torch.manual_seed(2)
    q = DoReFaQuantizer(bits, "weight")
    x = torch.randn(500)
    q(x)
    grid, codes = q.grid(), q.codes(x)
    values = grid.dequantize(codes)
    again = torch.clamp(torch.round(values / grid.scale + grid.zero_point), grid.qmin, grid.qmax)
    torch.testing.assert_close(again, codes)


def test_activation_gradient_is_ste_inside_zero_to_one():
    x = torch.tensor([-0.5, 0.15, 0.45, 0.75, 1.2], requires_grad=True)
    DoReFaQuantizer(2, "activation")(x).backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))


def test_weight_gradient_goes_through_tanh_and_max():
    # tanh = [-.4 -.3 .1 .5 .8], M = .8; out_3 = 2 round(3 w_t) / 3 - 1, w_t = tanh / 2M + 1/2
    w = torch.atanh(torch.tensor([-0.4, -0.3, 0.1, 0.5, 0.8])).requires_grad_(True)
    DoReFaQuantizer(2, "weight")(w)[3].backward()
    # d/dw_3 = (1 - .5^2) / M = .9375; d/dw_4 (the max) = -t_3 / M^2 (1 - .8^2) = -.28125
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 0.0, 0.0, 0.9375, -0.28125]))


def test_binary_weight_gradient_is_straight_through():
    w = torch.tensor([-0.7, 0.2, 1.5], requires_grad=True)
    DoReFaQuantizer(1, "weight")(w).backward(torch.tensor([1.0, -2.0, 3.0]))
    torch.testing.assert_close(w.grad, torch.tensor([1.0, -2.0, 3.0]))


def test_per_channel_weight_ranges_differ_per_channel():
    w = torch.tensor([[0.5, -0.25, 0.1], [5.0, -2.5, 1.0]])
    per_channel = DoReFaQuantizer(2, "weight", per_channel=True)(w)
    per_tensor = DoReFaQuantizer(2, "weight")(w)
    # row 0 alone: w_t = [1, .235, .608] -> codes 3 1 2; row 1: w_t = [1, .0066, .881] -> 3 0 3
    torch.testing.assert_close(per_channel, torch.tensor([[1, -1 / 3, 1 / 3], [1.0, -1.0, 1.0]]))
    # against the global max .99991: row 0 w_t = [.731, .378, .550] -> codes 2 1 2
    torch.testing.assert_close(per_tensor[0], torch.tensor([1 / 3, -1 / 3, 1 / 3]))
    binary = DoReFaQuantizer(1, "weight", per_channel=True)
    torch.testing.assert_close(binary(w).abs()[:, 0], torch.tensor([0.85 / 3, 8.5 / 3]))
    assert binary.grid().axis == 0


@pytest.mark.parametrize(
    "role,bits,per_channel", [("weight", 3, False), ("weight", 1, True), ("activation", 3, False)]
)
def test_state_dict_round_trip(role, bits, per_channel):
    torch.manual_seed(3)
    x = torch.randn(4, 6)
    q = DoReFaQuantizer(bits, role, per_channel=per_channel)
    q(x)
    fresh = DoReFaQuantizer(bits, role, per_channel=per_channel)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh.grid().scale, q.grid().scale)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "role,bits,per_channel",
    [
        ("weight", 4, False),
        ("weight", 1, False),
        ("weight", 1, True),
        ("weight", 2, True),
        ("activation", 4, False),
    ],
)
def test_grid_dequantize_codes_equals_forward(role, bits, per_channel):
    torch.manual_seed(4)
    x = torch.randn(5, 8)
    q = DoReFaQuantizer(bits, role, per_channel=per_channel)
    out = q(x)
    torch.testing.assert_close(q.grid().dequantize(q.codes(x)), out)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=0),
        dict(bits=9),
        dict(bits=4, role="activation", per_channel=True),
        dict(bits=4, role="activation", signed=True),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        DoReFaQuantizer(**kwargs)


def test_unknown_option_raises():
    with pytest.raises(ValueError, match="unknown option"):
        build_quantizer("dorefa", 4, "weight", delta=0.1)

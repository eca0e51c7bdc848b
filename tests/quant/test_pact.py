"""PACT quantizer: forward values, the alpha gradient, DoReFa weights, grid, state, bad input."""

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.methods.pact import PACTQuantizer


def with_alpha(bits, alpha):
    q = PACTQuantizer(bits, "activation", init_alpha=alpha)
    q.initialized.fill_(True)
    return q


# alpha = 2: y = clip(x, 0, 2) = [0 .3 .9 1.5 2]; y_q = round(y n / 2) * 2 / n
X = torch.tensor([-1.0, 0.3, 0.9, 1.5, 2.5])
EXPECTED = {
    1: [0.0, 0.0, 0.0, 2.0, 2.0],  # y / 2 = 0 .15 .45 .75 1
    2: [0, 0, 2 / 3, 4 / 3, 2],  # y * 1.5 = 0 .45 1.35 2.25 3
    4: [0, 4 / 15, 14 / 15, 22 / 15, 2],  # y * 7.5 = 0 2.25 6.75 11.25 15
    8: [0, 76 / 255, 230 / 255, 382 / 255, 2],  # y * 127.5 = 0 38.25 114.75 191.25 255
}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_forward_matches_hand_computation(bits):
    torch.testing.assert_close(with_alpha(bits, 2.0)(X), torch.tensor(EXPECTED[bits]))


def test_weights_are_dorefa_weights():
    # tanh(w) = [-.8 -.3 .1 .5 .8] -> w_t * 3 = 0 .9375 1.6875 2.4375 3 -> codes 0 1 2 2 3
    w = torch.atanh(torch.tensor([-0.8, -0.3, 0.1, 0.5, 0.8]))
    out = PACTQuantizer(2, "weight")(w)
    torch.testing.assert_close(out, torch.tensor([-1, -1 / 3, 1 / 3, 1 / 3, 1]))
    assert not any(True for _ in PACTQuantizer(2, "weight").parameters())


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_at_most_two_to_the_bits_levels(bits, role):
    torch.manual_seed(0)
    x = torch.randn(20000) * 3
    q = PACTQuantizer(bits, role, init_alpha="max")
    levels = q(x).unique().numel()
    assert levels <= 2**bits
    if bits <= 4:
        assert levels == 2**bits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_is_idempotent(bits):
    torch.manual_seed(1)
    q = with_alpha(bits, 3.0)
    once = q(torch.randn(1000) * 3)
    torch.testing.assert_close(q(once), once, rtol=0, atol=0)
    codes = q.codes(once)
    torch.testing.assert_close(q.codes(q.grid().dequantize(codes)), codes)


def test_weight_grid_is_idempotent():
    """DoReFa weights land in [-1, 1] whatever the input range: check the grid round trip."""
    torch.manual_seed(2)
    q = PACTQuantizer(3, "weight")
    x = torch.randn(500)
    q(x)
    grid, codes = q.grid(), q.codes(x)
    values = grid.dequantize(codes)
    again = torch.round(values / grid.scale + grid.zero_point)
    torch.testing.assert_close(again, codes)


def test_gradients_follow_the_paper():
    x = torch.tensor([-1.0, 0.5, 1.9, 2.0, 3.0], requires_grad=True)
    q = with_alpha(2, 2.0)
    q(x).backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    # d y_q / d x = 1 on 0 <= x < alpha; d y_q / d alpha = 1 where x >= alpha: 4 + 5
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 0.0, 0.0]))
    torch.testing.assert_close(q.alpha.grad, torch.tensor(9.0))


def test_alpha_gradient_only_where_x_reaches_alpha():
    q = with_alpha(3, 2.0)
    x = torch.tensor([-1.0, 0.3, 1.1, 1.99, 2.0, 7.0])
    out = q(x)
    per_element = [torch.autograd.grad(out[i], q.alpha, retain_graph=True)[0] for i in range(6)]
    torch.testing.assert_close(torch.stack(per_element), torch.tensor([0.0, 0, 0, 0, 1, 1]))


def test_alpha_initialisation():
    assert PACTQuantizer(4, "activation").alpha.item() == 10.0
    q = PACTQuantizer(4, "activation", init_alpha="max")
    q(torch.tensor([0.5, 3.5, -2.0]))
    assert q.alpha.item() == 3.5


def test_per_channel_weight_ranges_differ_per_channel():
    w = torch.tensor([[0.5, -0.25, 0.1], [5.0, -2.5, 1.0]])
    # row 0 alone: w_t = [1, .235, .608] -> codes 3 1 2 (per tensor it would be 2 1 2)
    out = PACTQuantizer(2, "weight", per_channel=True)(w)
    torch.testing.assert_close(out, torch.tensor([[1, -1 / 3, 1 / 3], [1.0, -1.0, 1.0]]))


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_state_dict_round_trip(role):
    torch.manual_seed(3)
    x = torch.randn(4, 6) * 2
    q = PACTQuantizer(3, role, init_alpha=1.7)
    q(x)
    fresh = PACTQuantizer(3, role)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_grid_dequantize_codes_equals_forward(role):
    torch.manual_seed(4)
    x = torch.randn(5, 8)
    q = PACTQuantizer(4, role, init_alpha=1.3)
    out = q(x)
    torch.testing.assert_close(q.grid().dequantize(q.codes(x)), out)
    if role == "activation":
        torch.testing.assert_close(q.grid().scale, torch.tensor(1.3 / 15))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=0),
        dict(bits=9),
        dict(bits=4, role="activation", per_channel=True),
        dict(bits=4, role="activation", signed=True),
        dict(bits=4, role="activation", init_alpha=-1.0),
        dict(bits=4, role="activation", init_alpha="min"),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        PACTQuantizer(**kwargs)


def test_unknown_option_raises():
    with pytest.raises(ValueError, match="init_alpha"):
        build_quantizer("pact", 4, "activation", alpha=3.0)

"""DSQ: hard forward values, soft-function gradients, initialisation, grid and state."""

import math

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.methods.dsq import DSQQuantizer


def fixed(bits, role, lower, upper, alpha=0.2, per_channel=False):
    """A DSQ quantizer with a hand-set range (no data initialisation)."""
    q = DSQQuantizer(bits, role, per_channel=per_channel)
    q.lower.data = torch.as_tensor(lower, dtype=torch.float32).clone()
    q.upper.data = torch.as_tensor(upper, dtype=torch.float32).clone()
    q.alpha.data.fill_(alpha)
    q.initialized.fill_(True)
    return q


# l = -1, u = 1: code = round((clip(x) + 1) * n / 2), value = -1 + 2 code / n
WEIGHT_X = torch.tensor([-1.5, -0.55, -0.1, 0.3, 0.77, 1.2])
WEIGHT_CODES = {
    1: [0, 0, 0, 1, 1, 1],  # (x + 1) / 2 = 0 .225 .45 .65 .885 1
    2: [0, 1, 1, 2, 3, 3],  # * 1.5 = 0 .675 1.35 1.95 2.655 3
    4: [0, 3, 7, 10, 13, 15],  # * 7.5 = 0 3.375 6.75 9.75 13.275 15
    8: [0, 57, 115, 166, 226, 255],  # * 127.5 = 0 57.375 114.75 165.75 225.675 255
}
# l = 0, u = 2: code = round(clip(x) * n / 2), value = 2 code / n
ACT_X = torch.tensor([-0.5, 0.3, 0.9, 1.45, 2.4])
ACT_CODES = {
    1: [0, 0, 0, 1, 1],  # x / 2 = 0 .15 .45 .725 1
    2: [0, 0, 1, 2, 3],  # 1.5 x = 0 .45 1.35 2.175 3
    4: [0, 2, 7, 11, 15],  # 7.5 x = 0 2.25 6.75 10.875 15
    8: [0, 38, 115, 185, 255],  # 127.5 x = 0 38.25 114.75 184.875 255
}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weight_forward_is_the_hard_quantizer(bits):
    n = 2**bits - 1
    expected = -1 + 2 * torch.tensor(WEIGHT_CODES[bits], dtype=torch.float32) / n
    q = fixed(bits, "weight", -1.0, 1.0)
    torch.testing.assert_close(q(WEIGHT_X), expected)
    torch.testing.assert_close(q.codes(WEIGHT_X), torch.tensor(WEIGHT_CODES[bits]).float())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_forward_is_the_hard_quantizer(bits):
    n = 2**bits - 1
    expected = 2 * torch.tensor(ACT_CODES[bits], dtype=torch.float32) / n
    torch.testing.assert_close(fixed(bits, "activation", 0.0, 2.0)(ACT_X), expected)


# l = 0, u = 3, 2 bits: Delta = 1; alpha = 0.2: k = ln 9, s = 1 / tanh(ln 9 / 2) = 1 / 0.8 = 1.25
K, S = math.log(9.0), 1.25


def tanh_k(d):
    return math.tanh(K * d)


def test_soft_function_value_and_input_gradient_at_a_known_point():
    q = fixed(2, "activation", 0.0, 3.0)
    x = torch.tensor([1.3], requires_grad=True)  # interval 1, midpoint 1.5, x - m = -0.2
    out = q(x)
    assert float(out.detach()) == 1.0  # hard value: round(1.3)
    soft = 1 + (S * tanh_k(-0.2) + 1) / 2
    assert float(q.soft_quantize(x.detach()).detach()) == pytest.approx(soft, rel=1e-6)
    out.backward()
    # dQ_S/dx = Delta / 2 * s * k * (1 - tanh^2(k (x - m)))
    assert float(x.grad) == pytest.approx(0.5 * S * K * (1 - tanh_k(-0.2) ** 2), rel=1e-5)


def test_alpha_gradient_is_the_soft_functions_derivative():
    q = fixed(2, "activation", 0.0, 3.0)
    q(torch.tensor([1.3])).backward()
    # Q_S = l + Delta (i + (s tanh(k d) + 1) / 2), s = 1 / (1 - alpha), k = ln(2/alpha - 1) / Delta
    alpha, d = 0.2, -0.2
    ds = 1 / (1 - alpha) ** 2
    dk = -2 / (alpha * (2 - alpha))
    expected = 0.5 * (ds * tanh_k(d) + S * (1 - tanh_k(d) ** 2) * d * dk)
    assert float(q.alpha.grad) == pytest.approx(expected, rel=1e-5)


def test_range_gradients_match_finite_differences_of_the_soft_function():
    x = torch.tensor([0.2, 1.3, 2.6, -0.4, 3.5], dtype=torch.float64)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5], dtype=torch.float64)
    q = fixed(2, "activation", 0.0, 3.0).double()
    q(x).backward(g)
    eps = 1e-6
    for name in ("lower", "upper", "alpha"):
        param = getattr(q, name)
        with torch.no_grad():
            param += eps
            up = (q.soft_quantize(x) * g).sum()
            param -= 2 * eps
            down = (q.soft_quantize(x) * g).sum()
            param += eps
        assert float(param.grad) == pytest.approx(float(up - down) / (2 * eps), rel=1e-4)


def test_clipped_inputs_pass_gradient_to_the_bound_only():
    q = fixed(2, "activation", 0.0, 3.0)
    x = torch.tensor([-1.0, 4.0], requires_grad=True)
    q(x).backward(torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(x.grad, torch.zeros(2))
    assert float(q.lower.grad) == pytest.approx(2.0, abs=1e-5)
    assert float(q.upper.grad) == pytest.approx(5.0, abs=1e-5)
    assert float(q.alpha.grad) == pytest.approx(0.0, abs=1e-6)


def test_alpha_is_clamped_to_half():
    wide, half = fixed(2, "activation", 0.0, 3.0, alpha=0.9), fixed(2, "activation", 0.0, 3.0, 0.5)
    x = torch.linspace(0, 3, 31)
    torch.testing.assert_close(wide.soft_quantize(x), half.soft_quantize(x))
    wide(x).sum().backward()
    assert float(wide.alpha.grad) == 0.0


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_at_most_two_to_the_bits_levels_and_idempotent(bits, role):
    torch.manual_seed(0)
    x = torch.randn(20000)
    x = x if role == "weight" else x.relu()
    q = DSQQuantizer(bits, role)
    out = q(x)
    assert out.unique().numel() <= 2**bits
    if bits <= 4:
        assert out.unique().numel() == 2**bits
    torch.testing.assert_close(q(out), out)


def test_initialisation_from_data():
    weight = torch.tensor([1.0, -1.0, 1.0, -1.0]).repeat(3, 1) * torch.tensor([[1.0], [2.0], [4.0]])
    q = DSQQuantizer(4, "weight", per_channel=True)
    q(weight)
    # row k * [1, -1, 1, -1]: unbiased std k * sqrt(4/3); u = 3 std, l = -u
    torch.testing.assert_close(q.upper.detach(), 2 * 3**0.5 * torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(q.lower.detach(), -q.upper.detach())
    assert float(q.alpha.detach()) == pytest.approx(0.2)
    act = DSQQuantizer(4, "activation")
    act(torch.tensor([0.0, 0.5, 3.0, 1.0]))
    assert (float(act.lower.detach()), float(act.upper.detach())) == (0.0, 3.0)


def test_grid_is_uniform_with_fractional_zero_point():
    q = fixed(2, "weight", -1.0, 2.0)  # Delta = 1, zero point 1
    grid = q.grid()
    assert (grid.qmin, grid.qmax, grid.uniform) == (0, 3, True)
    assert float(grid.scale) == pytest.approx(1.0) and float(grid.zero_point) == pytest.approx(1.0)
    q = fixed(2, "weight", -0.5, 1.0)  # Delta = 0.5, zero point 1; and a fractional one:
    assert float(q.grid().zero_point) == pytest.approx(1.0)
    assert float(fixed(2, "weight", -0.25, 1.0).grid().zero_point) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "role,per_channel", [("weight", False), ("weight", True), ("activation", False)]
)
def test_grid_dequantize_codes_equals_forward(role, per_channel):
    torch.manual_seed(3)
    x = torch.randn(5, 8)
    q = DSQQuantizer(4, role, per_channel=per_channel)
    out = q(x)
    torch.testing.assert_close(q.grid().dequantize(q.codes(x)), out)


@pytest.mark.parametrize(
    "role,per_channel", [("weight", False), ("weight", True), ("activation", False)]
)
def test_state_dict_round_trip(role, per_channel):
    torch.manual_seed(2)
    x = torch.randn(4, 6)
    q = DSQQuantizer(3, role, per_channel=per_channel)
    q(x)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.05)
    fresh = DSQQuantizer(3, role, per_channel=per_channel)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=0),
        dict(bits=9),
        dict(bits=4, role="activation", per_channel=True),
        dict(bits=4, init_alpha=0.0),
        dict(bits=4, init_alpha=1.5),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        DSQQuantizer(**kwargs)


def test_registered_with_its_options():
    q = build_quantizer("dsq", 3, "activation", init_alpha=0.3)
    assert isinstance(q, DSQQuantizer) and float(q.alpha.detach()) == pytest.approx(0.3)

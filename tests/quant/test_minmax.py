"""Min/max affine quantizer: values, integer zero point, EMA activation range, freezing, state."""

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.methods.minmax import MinMaxQuantizer

# range [-1, 2]: scale = 3 / n, zero point = round(1 / scale), code = round(w / scale + zp)
WEIGHT = torch.tensor([-1.0, -0.2, 0.35, 2.0])
WEIGHT_EXPECTED = {
    1: (3.0, 0, [0.0, 0.0, 0.0, 3.0]),  # zp round(1/3) = 0: w/3 = -.33 -.07 .12 .67
    2: (1.0, 1, [-1.0, 0.0, 0.0, 2.0]),  # w + 1 = 0 .8 1.35 3
    4: (0.2, 5, [-1.0, -0.2, 0.4, 2.0]),  # 5w + 5 = 0 4 6.75 15
    8: (3 / 255, 85, [c * 3 / 255 for c in (-85, -17, 30, 170)]),  # 85w + 85 = 0 68 114.75 255
}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weight_forward_by_hand(bits):
    scale, zero_point, expected = WEIGHT_EXPECTED[bits]
    q = MinMaxQuantizer(bits, "weight")
    torch.testing.assert_close(q(WEIGHT), torch.tensor(expected))
    grid = q.grid()
    assert float(grid.scale) == pytest.approx(scale)
    assert float(grid.zero_point) == zero_point  # an integer
    assert (grid.qmin, grid.qmax) == (0, 2**bits - 1)


def test_range_always_contains_zero():
    q = MinMaxQuantizer(2, "weight")
    # min 0.5 widened to 0: scale 2/3, zp 0, codes round(1.5 w) = 1 2 3 (0.75, 1.65, 3)
    torch.testing.assert_close(q(torch.tensor([0.5, 1.1, 2.0])), torch.tensor([2, 4, 6]) / 3)
    assert float(q.grid().zero_point) == 0.0


def test_weight_range_follows_the_current_weight():
    q = MinMaxQuantizer(2, "weight")
    q(WEIGHT)
    q(WEIGHT * 2)
    assert (float(q.min_value), float(q.max_value)) == (-2.0, 4.0)


def test_per_channel_ranges_differ_per_channel():
    weight = torch.tensor([[-1.0, 0.0, 2.0], [-0.05, 0.2, 0.55], [0.0, 1.0, 3.0]])
    q = MinMaxQuantizer(2, "weight", per_channel=True)
    out = q(weight)
    grid = q.grid()
    torch.testing.assert_close(grid.scale, torch.tensor([1.0, 0.2, 1.0]))
    torch.testing.assert_close(grid.zero_point, torch.tensor([1.0, 0.0, 0.0]))  # .05/.2 = .25 -> 0
    assert grid.axis == 0
    # row 2: codes round(x / .2) = [-.25 -> 0, 1, 2.75 -> 3]
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.2, 0.6]))


def test_ema_range_update_and_freezing():
    q = MinMaxQuantizer(4, "activation", momentum=0.9).train()
    q(torch.tensor([0.0, 1.0, 2.0]))  # first batch: the range itself
    assert float(q.min_value) == pytest.approx(0.0) and float(q.max_value) == pytest.approx(2.0)
    q(torch.tensor([-1.0, 0.0, 4.0]))
    assert float(q.min_value) == pytest.approx(0.9 * 0 + 0.1 * -1)
    assert float(q.max_value) == pytest.approx(0.9 * 2 + 0.1 * 4)
    # the output already uses the updated range: scale 2.3 / 15, zero point round(.1 / scale) = 1
    grid = q.grid()
    assert float(grid.scale) == pytest.approx(2.3 / 15) and float(grid.zero_point) == 1.0

    q.eval()
    q(torch.tensor([-5.0, 10.0]))  # eval: no update
    assert float(q.max_value) == pytest.approx(2.2)
    q.train()
    q.freeze()
    q(torch.tensor([-5.0, 10.0]))  # frozen: no update in training mode either
    assert float(q.max_value) == pytest.approx(2.2) and bool(q.frozen)
    q.unfreeze()
    q(torch.tensor([0.0, 10.0]))
    assert float(q.max_value) == pytest.approx(0.9 * 2.2 + 0.1 * 10)


def test_momentum_zero_tracks_the_last_batch():
    q = MinMaxQuantizer(4, "activation", momentum=0.0).train()
    q(torch.tensor([0.0, 1.0]))
    q(torch.tensor([0.0, 5.0]))
    assert float(q.max_value) == 5.0


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_straight_through_gradient_everywhere(role):
    q = MinMaxQuantizer(3, role)
    q.calibrate(torch.tensor([0.0, 1.0]))
    q.eval()
    q.freeze()
    x = torch.tensor([-3.0, 0.1, 0.55, 7.0], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    q(x).backward(g)
    torch.testing.assert_close(x.grad, g)  # clipped elements included (GDFQ's estimator)


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_at_most_two_to_the_bits_levels_and_idempotent(bits, role):
    torch.manual_seed(0)
    x = torch.randn(20000)
    x = x if role == "weight" else x.relu()
    q = MinMaxQuantizer(bits, role).eval()
    out = q(x)
    assert out.unique().numel() <= 2**bits
    if role == "activation":  # the range is fixed in eval mode: quantizing again changes nothing
        torch.testing.assert_close(q(out), out)
    else:  # weights re-read their range; the grid maps every code's value back to it
        grid, codes = q.grid(), q.codes(x)
        again = torch.round(grid.dequantize(codes) / grid.scale + grid.zero_point)
        torch.testing.assert_close(again, codes)


@pytest.mark.parametrize(
    "role,per_channel", [("weight", False), ("weight", True), ("activation", False)]
)
def test_grid_dequantize_codes_equals_forward(role, per_channel):
    torch.manual_seed(3)
    x = torch.randn(5, 8)
    q = MinMaxQuantizer(4, role, per_channel=per_channel)
    out = q(x)
    torch.testing.assert_close(q.grid().dequantize(q.codes(x)), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "role,per_channel", [("weight", False), ("weight", True), ("activation", False)]
)
def test_state_dict_round_trip(role, per_channel):
    torch.manual_seed(2)
    q = MinMaxQuantizer(3, role, per_channel=per_channel).train()
    for _ in range(3):
        q(torch.randn(4, 6))
    q.freeze()
    fresh = MinMaxQuantizer(3, role, per_channel=per_channel)
    fresh.load_state_dict(q.state_dict())
    assert bool(fresh.frozen)
    x = torch.randn(4, 6) * 2
    torch.testing.assert_close(fresh.eval()(x), q.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(bits=0), dict(bits=9), dict(bits=4, role="activation", per_channel=True)]
    + [dict(bits=4, momentum=m) for m in (1.0, -0.1)],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MinMaxQuantizer(**kwargs)


def test_registered_with_momentum_option():
    q = build_quantizer("minmax", 8, "activation", momentum=0.5)
    assert isinstance(q, MinMaxQuantizer) and q.momentum == 0.5

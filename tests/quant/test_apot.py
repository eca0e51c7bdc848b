"""APoT: level construction, projection, reparameterised clipping gradient, grid and state."""

import math

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.methods.apot import APoTQuantizer, apot_levels, apot_magnitudes


def fixed(bits, role, alpha, **options):
    q = APoTQuantizer(bits, role, init_alpha=alpha, **options)
    q.calibrate(torch.ones(3))
    return q


def test_level_sets_by_hand():
    assert apot_magnitudes(0).tolist() == [1.0]
    assert apot_magnitudes(1).tolist() == [0.0, 1.0]
    assert apot_magnitudes(2).tolist() == [0.0, 0.25, 0.5, 1.0]  # one term {0, 2^-1, 2^-2, 2^-3}
    # {0, 2^-1, 2^-2, 2^-4} + {0, 2^-3}: 0 .0625 .125 .1875 .25 .375 .5 .625, over .625
    torch.testing.assert_close(
        apot_magnitudes(3), torch.tensor([0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0])
    )
    # {0, 2^-1, 2^-3, 2^-5} + {0, 2^-2, 2^-4, 2^-6}, in units of 2^-6, over the largest (48)
    sixty_fourths = [0, 1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 33, 36, 48]
    torch.testing.assert_close(apot_magnitudes(4), torch.tensor(sixty_fourths) / 48.0)


@pytest.mark.parametrize("magnitude_bits", range(9))
def test_level_count_and_range(magnitude_bits):
    levels = apot_magnitudes(magnitude_bits)
    assert levels.numel() == levels.unique().numel() == 2**magnitude_bits
    assert float(levels.max()) == 1.0 and bool((levels[1:] > levels[:-1]).all())


def test_signed_levels_are_mirrored():
    assert apot_levels(1, signed=True).tolist() == [-1.0, 1.0]
    assert apot_levels(2, signed=True).tolist() == [-1.0, 0.0, 1.0]
    assert apot_levels(3, signed=True).tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    for bits in range(2, 9):
        assert apot_levels(bits, signed=True).numel() == 2**bits - 1


# activations, alpha = 2: ratio x / 2 = [-.25 .15 .45 .6 1.25], clipped to [0, 1]
ACT_X = torch.tensor([-0.5, 0.3, 0.9, 1.2, 2.5])
ACT_EXPECTED = {
    1: [0, 0, 0, 2, 2],  # {0, 1}: midpoint .5
    2: [0, 0.5, 1, 1, 2],  # {0 .25 .5 1}: .15 -> .25, .45 -> .5, .6 -> .5
    4: [0, 16 / 48, 1, 4 / 3, 2],  # .15 -> 8/48, .45 -> 24/48, .6 -> 32/48 (see above)
}
# weights without normalisation, alpha = 1
WEIGHT_X = torch.tensor([-1.5, -0.4, 0.0, 0.2, 0.65])
WEIGHT_EXPECTED = {
    1: [-1, -1, 1, 1, 1],  # sign levels
    2: [-1, 0, 0, 0, 1],  # {-1, 0, 1}
    3: [-1, -0.5, 0, 0.25, 0.5],  # magnitudes {0 .25 .5 1}
    4: [-1, -0.4, 0, 0.2, 0.6],  # magnitudes {0 .1 .2 .3 .4 .6 .8 1}
}


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_activation_forward_by_hand(bits):
    out = fixed(bits, "activation", 2.0)(ACT_X)
    torch.testing.assert_close(out, torch.tensor(ACT_EXPECTED[bits], dtype=torch.float32))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_weight_forward_by_hand(bits):
    out = fixed(bits, "weight", 1.0, weight_norm=False)(WEIGHT_X)
    torch.testing.assert_close(out, torch.tensor(WEIGHT_EXPECTED[bits], dtype=torch.float32))


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_eight_bits_is_the_nearest_level(role):
    torch.manual_seed(0)
    x = torch.randn(2000) * 0.6
    q = fixed(8, role, 1.0, weight_norm=False)
    levels = apot_levels(8, signed=role == "weight")
    clipped = x.clamp(-1.0 if role == "weight" else 0.0, 1.0)
    nearest = levels[(clipped.unsqueeze(1) - levels).abs().argmin(dim=1)]
    torch.testing.assert_close(q(x), nearest)


def test_weight_normalisation_and_scale():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, unbiased std sqrt(2.5)
    # normalised: [-1.26 -.63 0 .63 1.26] -> clip, magnitudes {0 .25 .5 1}: [-1 -.5 0 .5 1]
    unit = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    torch.testing.assert_close(fixed(3, "weight", 1.0)(w), 3 + math.sqrt(2.5) * unit)
    torch.testing.assert_close(fixed(3, "weight", 1.0, keep_weight_scale=False)(w), unit)
    fresh = APoTQuantizer(3, "weight")
    fresh(w)
    assert float(fresh.alpha.detach()) == pytest.approx(3.0)  # 3 std of the normalised weight


def test_activation_gradients_are_the_reparameterised_clipping_rule():
    q = fixed(2, "activation", 2.0)
    x = torch.tensor([0.3, 0.9, 2.5, -0.5], requires_grad=True)
    q(x).backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # ratio .15 .45 1.25 -.25 -> P = .25 .5 1 0; inside: P - ratio; outside: sign (0 below 0)
    assert float(q.alpha.grad) == pytest.approx(1 * 0.1 + 2 * 0.05 + 3 * 1 + 4 * 0, rel=1e-5)
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0, 0.0, 0.0]))


def test_weight_gradients_are_not_clipped():
    q = fixed(3, "weight", 1.0, weight_norm=False)
    x = torch.tensor([-1.5, -0.4, 0.2, 0.65], requires_grad=True)
    q(x).sum().backward()
    # P = -1 -.5 .25 .5: sign(-1.5) + (-.5 + .4) + (.25 - .2) + (.5 - .65)
    assert float(q.alpha.grad) == pytest.approx(-1 - 0.1 + 0.05 - 0.15, rel=1e-5)
    torch.testing.assert_close(x.grad, torch.ones(4))


def test_normalised_weight_gradients():
    q = fixed(3, "weight", 1.0)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    q(w).backward(g)
    torch.testing.assert_close(w.grad, g)  # d out / d w = std * 1 / std
    n = 1 / math.sqrt(2.5)  # normalised: [-2n, -n, 0, n, 2n], n = 0.632; P = [-1 -.5 0 .5 1]
    per_element = [-1.0, -0.5 + n, 0.0, 0.5 - n, 1.0]  # outside: sign; inside: P - ratio
    expected = math.sqrt(2.5) * sum(gi * d for gi, d in zip(g.tolist(), per_element))
    assert float(q.alpha.grad) == pytest.approx(expected, rel=1e-5)


def test_per_channel_alpha_gradient_and_levels():
    w = torch.tensor([[1.0, -1.0, 0.5, -0.5], [4.0, -4.0, 2.0, -2.0]])
    q = APoTQuantizer(3, "weight", per_channel=True)
    q(w).sum().backward()
    assert q.alpha.grad.shape == (2,)
    torch.testing.assert_close(q.alpha.detach(), torch.tensor([3.0, 3.0]))
    levels = q.grid().levels
    assert levels.shape == (2, 7)
    torch.testing.assert_close(levels[1], 4 * levels[0])  # row 2 is row 1 scaled by 4


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_at_most_two_to_the_bits_levels(bits, role):
    torch.manual_seed(0)
    x = torch.randn(20000) * 3
    x = x if role == "weight" else x.relu()
    q = APoTQuantizer(bits, role)
    assert q(x).unique().numel() <= 2**bits
    assert q.grid().levels.numel() <= 2**bits


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_projection_is_idempotent(role):
    torch.manual_seed(1)
    q = APoTQuantizer(4, role, weight_norm=False)
    x = torch.randn(500) * 3
    out = q(x)
    torch.testing.assert_close(q(out), out)


def test_normalised_grid_maps_every_level_to_itself():
    torch.manual_seed(1)
    q = APoTQuantizer(4, "weight")
    w = torch.randn(6, 10) * 0.1 + 0.02
    q(w)
    codes = q.codes(w)
    grid = q.grid()
    values = grid.dequantize(codes)
    again = (values.unsqueeze(-1) - grid.levels).abs().argmin(dim=-1)
    torch.testing.assert_close(again.float(), codes)
    assert not APoTQuantizer.uniform and not grid.uniform


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_statistics_are_kept_outside_training(per_channel):
    torch.manual_seed(4)
    w = torch.randn(3, 12) * 0.1 + 0.05
    q = APoTQuantizer(4, "weight", per_channel=per_channel)
    out = q(w)  # training mode with gradients recorded: statistics refreshed and stored
    mean, std = q.weight_mean.clone(), q.weight_std.clone()
    torch.testing.assert_close(mean, w.mean(dim=1) if per_channel else w.mean())
    q.eval()
    assert not torch.equal(q(w * 2), out * 2)  # eval: normalised with the stored statistics
    q.train()
    with torch.no_grad():
        rebuilt = q.grid().dequantize(q.codes(w))
        # the forward is a function of the codes: quantizing the dequantized weight gives it back
        torch.testing.assert_close(q(rebuilt), out, rtol=0, atol=0)
    assert torch.equal(q.weight_mean, mean) and torch.equal(q.weight_std, std)
    q(w * 3)  # training again: refreshed
    torch.testing.assert_close(q.weight_std, 3 * std)


@pytest.mark.parametrize(
    "role,per_channel", [("weight", False), ("weight", True), ("activation", False)]
)
def test_grid_dequantize_codes_equals_forward(role, per_channel):
    torch.manual_seed(3)
    x = torch.randn(5, 8)
    q = APoTQuantizer(4, role, per_channel=per_channel)
    out = q(x)
    torch.testing.assert_close(q.grid().dequantize(q.codes(x)), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "role,per_channel", [("weight", False), ("weight", True), ("activation", False)]
)
def test_state_dict_round_trip(role, per_channel):
    torch.manual_seed(2)
    x = torch.randn(4, 6)
    q = APoTQuantizer(3, role, per_channel=per_channel)
    q(x)
    with torch.no_grad():
        q.alpha.mul_(0.7)
    fresh = APoTQuantizer(3, role, per_channel=per_channel)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(bits=0), dict(bits=4, init_alpha=0.0)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        APoTQuantizer(**kwargs)


def test_registered_by_name():
    q = build_quantizer("apot", 4, "activation", init_alpha=6.0)
    assert isinstance(q, APoTQuantizer)
    q(torch.rand(10))
    assert float(q.alpha.detach()) == 6.0

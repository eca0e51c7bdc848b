"""FAQD's binary and ternary weight projections: values, STE, grids, state and argument checks."""

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.methods.binary import BinaryQuantizer, TernaryQuantizer


def test_binary_values_by_hand():
    w = torch.tensor([-0.6, -0.1, 0.0, 0.3, 0.8])  # mean |w| = 1.8 / 5 = .36; sign(0) = +1
    expected = torch.tensor([-0.36, -0.36, 0.36, 0.36, 0.36])
    torch.testing.assert_close(BinaryQuantizer(1)(w), expected)


def test_binary_per_channel_values_differ_per_channel():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5], [-0.1, 0.3]])
    q = BinaryQuantizer(1, per_channel=True)
    expected = torch.tensor([[2.0, -2.0], [0.5, 0.5], [-0.2, 0.2]])
    torch.testing.assert_close(q(w), expected)
    torch.testing.assert_close(q.magnitude, torch.tensor([2.0, 0.5, 0.2]))


def test_ternary_values_by_hand():
    # mean |w| = 2.7 / 6 = .45, threshold .315: keeps -0.9 and 1.2, alpha = 2.1 / 2 = 1.05
    w = torch.tensor([-0.9, -0.2, 0.05, 0.3, 1.2, -0.05])
    expected = torch.tensor([-1.05, 0.0, 0.0, 0.0, 1.05, 0.0])
    torch.testing.assert_close(TernaryQuantizer(2)(w), expected)


def test_ternary_per_channel_values_differ_per_channel():
    w = torch.tensor([[1.0, -1.0, 0.1, 0.0], [2.0, 0.2, -2.0, 0.1]])
    # row 1: mean .525, threshold .3675, alpha 1; row 2: mean 1.075, threshold .7525, alpha 2
    q = TernaryQuantizer(2, per_channel=True)
    expected = torch.tensor([[1.0, -1.0, 0.0, 0.0], [2.0, 0.0, -2.0, 0.0]])
    torch.testing.assert_close(q(w), expected)
    torch.testing.assert_close(q.grid().scale, torch.tensor([1.0, 2.0]))


def test_all_zero_weight_stays_zero():
    assert TernaryQuantizer(2)(torch.zeros(5)).abs().sum() == 0
    assert BinaryQuantizer(1)(torch.zeros(5)).abs().sum() == 0


@pytest.mark.parametrize("cls,bits", [(BinaryQuantizer, 1), (TernaryQuantizer, 2)])
def test_straight_through_gradient(cls, bits):
    w = torch.tensor([-0.9, -0.2, 0.05, 0.3, 1.2], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0])
    cls(bits)(w).backward(g)
    torch.testing.assert_close(w.grad, g)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("cls,bits,levels", [(BinaryQuantizer, 1, 2), (TernaryQuantizer, 2, 3)])
def test_level_count_idempotence_and_grid(cls, bits, levels, per_channel):
    torch.manual_seed(0)
    w = torch.randn(4, 50)
    q = cls(bits, per_channel=per_channel)
    out = q(w)
    per_row = [row.unique().numel() for row in out] if per_channel else [out.unique().numel()]
    assert max(per_row) == levels <= 2**bits
    torch.testing.assert_close(q.grid().dequantize(q.codes(w)), out, rtol=0, atol=0)
    torch.testing.assert_close(q(out), out)  # projecting a projection changes nothing


def test_grids():
    binary = BinaryQuantizer(1)
    binary(torch.tensor([-0.6, 0.2]))  # m = .4: values 2m (c - 1/2) = -.4, +.4
    grid = binary.grid()
    assert (grid.bits, grid.qmin, grid.qmax) == (1, 0, 1)
    assert float(grid.scale) == pytest.approx(0.8) and float(grid.zero_point) == 0.5
    torch.testing.assert_close(grid.dequantize(torch.tensor([0.0, 1.0])), torch.tensor([-0.4, 0.4]))
    ternary = TernaryQuantizer(2)
    ternary(torch.tensor([-0.9, 0.0, 1.2]))  # threshold .49, alpha 1.05
    grid = ternary.grid()
    assert (grid.bits, grid.qmin, grid.qmax, float(grid.zero_point)) == (2, -1, 1, 0.0)
    assert float(grid.scale) == pytest.approx(1.05)
    assert ternary.codes(torch.tensor([-0.9, 0.0, 1.2])).tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("cls,bits", [(BinaryQuantizer, 1), (TernaryQuantizer, 2)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_state_dict_round_trip(cls, bits, per_channel):
    torch.manual_seed(2)
    w = torch.randn(4, 6)
    q = cls(bits, per_channel=per_channel)
    out = q(w)
    fresh = cls(bits, per_channel=per_channel)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh.grid().scale, q.grid().scale)  # before any forward
    torch.testing.assert_close(fresh(w), out, rtol=0, atol=0)


@pytest.mark.parametrize("name,bits", [("binary", 1), ("ternary", 2)])
def test_activations_are_refused_with_an_alternative(name, bits):
    with pytest.raises(ValueError, match="weights only.*lsq"):
        build_quantizer(name, bits, "activation")


@pytest.mark.parametrize(
    "name,bits", [("binary", 2), ("binary", 4), ("ternary", 1), ("ternary", 4)]
)
def test_wrong_bit_width_is_explained(name, bits):
    with pytest.raises(ValueError, match="exactly"):
        build_quantizer(name, bits, "weight")


def test_registered_by_name():
    assert type(build_quantizer("binary", 1, "weight")) is BinaryQuantizer
    assert type(build_quantizer("ternary", 2, "weight", per_channel=True)) is TernaryQuantizer

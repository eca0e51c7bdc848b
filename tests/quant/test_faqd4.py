"""FAQD's 4-bit least-squares weight projection (``faqd4``): values by hand, the released
thresholds (ties round down), the least-squares scale, the step cap, the straight-through
gradient, per-channel scales, the grid and the codes that export reads."""

import pytest
import torch

from sqakd.quant import QuantPolicy, build_quantizer, calibrate, prepare
from sqakd.quant.methods.binary import LeastSquares4BitQuantizer


def test_values_by_hand():
    # max|w| = 3.75 -> d = 0.25; |w| / (2d) - 1/2 = [-0.5, 0, 0.5, 1, 4.5, 7] -> q = 0 0 1 1 5 7
    w = torch.tensor([0.0, 0.25, -0.5, 0.75, -2.5, 3.75])
    q = LeastSquares4BitQuantizer(4)
    codes = q.codes(w)
    torch.testing.assert_close(codes, torch.tensor([0.0, 0.0, -1.0, 1.0, -5.0, 7.0]))
    # s = (0.5 + 0.75 + 12.5 + 26.25) / (1 + 1 + 25 + 49) = 40 / 76
    scale = 40.0 / 76.0
    torch.testing.assert_close(q(w), scale * codes)
    torch.testing.assert_close(q.magnitude, torch.tensor(scale))


def test_thresholds_are_the_released_intervals():
    """q = j exactly on (2j - 1) d < |w| <= (2j + 1) d: the upper bound belongs to j."""
    d = 0.25
    w = torch.tensor(
        [15 * d] + [(2 * j + 1) * d for j in range(7)] + [(2 * j + 1) * d + 1e-3 for j in range(6)]
    )
    magnitudes = LeastSquares4BitQuantizer(4).codes(w).abs()
    assert magnitudes[1:8].tolist() == list(range(7))  # on the bound: the lower level
    assert magnitudes[8:].tolist() == list(range(1, 7))  # just above: the next level
    assert magnitudes[0] == 7


def test_the_scale_is_the_least_squares_fit_and_beats_its_neighbours():
    torch.manual_seed(0)
    w = torch.randn(64, 9)
    q = LeastSquares4BitQuantizer(4)
    codes = q.codes(w)
    value = q(w)
    best = ((w - value) ** 2).sum()
    for factor in (0.98, 1.02):
        assert ((w - factor * value) ** 2).sum() > best
    torch.testing.assert_close(q.magnitude, (w.abs() * codes.abs()).sum() / (codes**2).sum())


def test_the_step_is_capped_at_ten():
    w = torch.tensor([0.0, 25.0, 300.0])  # max/15 = 20 -> d = 10: 25 -> q 1, 300 -> q 7
    assert LeastSquares4BitQuantizer(4).codes(w).tolist() == [0.0, 1.0, 7.0]


def test_straight_through_gradient_and_per_channel_scales():
    w = torch.tensor([[0.1, -0.5, 1.5], [3.0, -1.0, 0.2]], requires_grad=True)
    q = LeastSquares4BitQuantizer(4, per_channel=True)
    (q(w) * torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    for row in range(2):
        alone = LeastSquares4BitQuantizer(4)
        torch.testing.assert_close(q(w.detach())[row], alone(w.detach()[row]))
        torch.testing.assert_close(q.magnitude[row], alone.magnitude)


def test_grid_dequantizes_the_codes_to_the_values():
    torch.manual_seed(1)
    w = torch.randn(8, 4, 3, 3)
    q = LeastSquares4BitQuantizer(4)
    value = q(w)
    grid = q.grid()
    assert (grid.bits, grid.qmin, grid.qmax) == (4, -7, 7)
    torch.testing.assert_close(grid.dequantize(q.codes(w)), value)


def test_an_all_zero_weight_stays_zero_and_bad_settings_are_refused():
    assert torch.equal(LeastSquares4BitQuantizer(4)(torch.zeros(5)), torch.zeros(5))
    with pytest.raises(ValueError, match="exactly 4 bit"):
        build_quantizer("faqd4", 2, "weight")
    with pytest.raises(ValueError, match="weights only"):
        build_quantizer("faqd4", 4, "activation")


def test_a_model_prepared_with_faqd4_weights_runs():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    policy = QuantPolicy(
        weight_method="faqd4", act_method="lsq", weight_bits=4, act_bits=4, first_last="same"
    )
    student = prepare(net, policy)
    images = torch.randn(2, 3, 8, 8)
    calibrate(student, [images])
    student(images).sum().backward()
    layer = student[2]
    assert set(layer.weight_quantizer.codes(layer.weight).abs().unique().tolist()) <= set(range(8))

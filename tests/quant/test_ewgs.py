"""EWGS / STE quantizer: forward values, gradient rule, grid, state, and the Hessian delta update."""

import pytest
import torch
from torch import nn

from sqakd.quant import build_quantizer
from sqakd.quant.methods.ewgs import (
    EWGSQuantizer,
    STEQuantizer,
    ewgs_round,
    hutchinson_trace,
    update_ewgs_deltas,
)


def fixed(bits, role, lower, upper, output_scale=1.0, delta=0.0):
    """An EWGS quantizer with a hand-set interval (no data initialisation)."""
    q = EWGSQuantizer(bits, role, delta=delta)
    q.lower.data.fill_(lower)
    q.upper.data.fill_(upper)
    if role == "weight":
        q.output_scale.data.fill_(output_scale)
    q.initialized.fill_(True)
    return q


# x_n = (x + 1) / 2 clipped = [0, 0.35, 0.55, 0.8, 1]; out = 0.5 * (2 round(x_n n) / n - 1)
WEIGHT_X = torch.tensor([-1.2, -0.3, 0.1, 0.6, 1.5])
WEIGHT_EXPECTED = {
    1: [-1, -1, 1, 1, 1],  # round(x_n) = 0 0 1 1 1
    2: [-1, -1 / 3, 1 / 3, 1 / 3, 1],  # x_n * 3 = 0 1.05 1.65 2.4 3
    4: [-1, -1 / 3, 1 / 15, 9 / 15, 1],  # x_n * 15 = 0 5.25 8.25 12 15
    8: [-1, 2 * 89 / 255 - 1, 2 * 140 / 255 - 1, 2 * 204 / 255 - 1, 1],  # 89.25 140.25 204
}
# lower 0, upper 2: x_n = [0, 0.15, 0.45, 0.75, 1]; out = round(x_n n) / n
ACT_X = torch.tensor([-0.5, 0.3, 0.9, 1.5, 2.4])
ACT_EXPECTED = {
    1: [0.0, 0.0, 0.0, 1.0, 1.0],
    2: [0, 0, 1 / 3, 2 / 3, 1],  # 0 0.45 1.35 2.25 3
    4: [0, 2 / 15, 7 / 15, 11 / 15, 1],  # 0 2.25 6.75 11.25 15
    8: [0, 38 / 255, 115 / 255, 191 / 255, 1],  # 0 38.25 114.75 191.25 255
}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weight_forward_matches_hand_computation(bits):
    q = fixed(bits, "weight", -1.0, 1.0, output_scale=0.5)
    expected = 0.5 * torch.tensor(WEIGHT_EXPECTED[bits])
    torch.testing.assert_close(q(WEIGHT_X), expected)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_forward_matches_hand_computation(bits):
    q = fixed(bits, "activation", 0.0, 2.0)
    torch.testing.assert_close(q(ACT_X), torch.tensor(ACT_EXPECTED[bits]))


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_at_most_two_to_the_bits_levels(bits, role):
    torch.manual_seed(0)
    x = torch.randn(20000) * 2
    x = x if role == "weight" else x.relu()  # the activation interval assumes ReLU outputs
    out = EWGSQuantizer(bits, role)(x)
    levels = out.unique().numel()
    assert levels <= 2**bits
    if bits <= 4:
        assert levels == 2**bits


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_grid_is_idempotent(role):
    """The output space differs from the input space ([lower, upper] vs [-s, s] or [0, 1]), so
    forward(forward(x)) != forward(x); instead the grid maps every code's value back to it."""
    torch.manual_seed(1)
    q = EWGSQuantizer(3, role)
    x = torch.randn(500)
    q(x)
    grid, codes = q.grid(), q.codes(x)
    values = grid.dequantize(codes)
    again = torch.clamp(torch.round(values / grid.scale + grid.zero_point), grid.qmin, grid.qmax)
    torch.testing.assert_close(again, codes)


def test_ewgs_round_backward_is_the_paper_rule():
    # x_n * 3 = 0.3 1.2 2.1 2.85 -> x_q = 0 1/3 2/3 1; x_n - x_q = 0.1 1/15 1/30 -0.05
    x_n = torch.tensor([0.1, 0.4, 0.7, 0.95], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5, -1.0])
    ewgs_round(x_n, 3, 0.2).backward(g)
    # g * (1 + 0.2 sign(g) (x_n - x_q))
    expected = torch.tensor([1.02, -2 * (1 - 0.2 / 15), 0.5 * (1 + 0.2 / 30), -1.01])
    torch.testing.assert_close(x_n.grad, expected)


def test_ewgs_differs_from_ste_by_delta_sign_g_g_error():
    x = torch.tensor([0.2, 0.8, 1.4, 1.9, 2.5])  # lower 0, upper 2: x_n = x / 2; last clipped
    g = torch.tensor([1.0, -2.0, 0.5, -1.0, 3.0])
    grads = []
    for delta in (0.2, 0.0):
        xi = x.clone().requires_grad_(True)
        fixed(2, "activation", 0.0, 2.0, delta=delta)(xi).backward(g)
        grads.append(xi.grad)
    # delta |g| (x_n - x_q) / (upper - lower) inside the interval, 0 where x is clipped
    expected = 0.2 * torch.tensor([1 * 0.1, 2 / 15, 0.5 / 30, -1 * 0.05, 0.0]) / 2
    torch.testing.assert_close(grads[0] - grads[1], expected)


def test_ste_is_registered_with_zero_delta():
    q = build_quantizer("ste", 4, "weight")
    assert isinstance(q, STEQuantizer) and float(q.delta) == 0.0


def test_per_channel_interval_per_channel():
    weight = torch.tensor([1.0, -1.0, 1.0, -1.0]).repeat(3, 1) * torch.tensor([[1.0], [2.0], [4.0]])
    q = EWGSQuantizer(4, "weight", per_channel=True)
    q(weight)
    # row k * [1, -1, 1, -1] has unbiased std k * sqrt(4/3); upper = 3 std = 2 sqrt(3) k
    torch.testing.assert_close(q.upper.detach(), 2 * 3**0.5 * torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(q.lower.detach(), -q.upper.detach())
    assert q.grid().axis == 0


@pytest.mark.parametrize(
    "role,per_channel", [("weight", False), ("weight", True), ("activation", False)]
)
def test_state_dict_round_trip(role, per_channel):
    torch.manual_seed(2)
    x = torch.randn(4, 6)
    q = EWGSQuantizer(3, role, per_channel=per_channel, delta=0.01)
    q(x)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.1)
    fresh = EWGSQuantizer(3, role, per_channel=per_channel)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)
    assert float(fresh.delta) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "role,per_channel", [("weight", False), ("weight", True), ("activation", False)]
)
def test_grid_dequantize_codes_equals_forward(role, per_channel):
    torch.manual_seed(3)
    x = torch.randn(5, 8)
    q = EWGSQuantizer(4, role, per_channel=per_channel)
    out = q(x)
    torch.testing.assert_close(q.grid().dequantize(q.codes(x)), out)


@pytest.mark.parametrize(
    "kwargs", [dict(bits=0), dict(bits=9), dict(bits=4, role="activation", per_channel=True)]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        EWGSQuantizer(**kwargs)


def test_unknown_option_raises_and_names_accepted():
    with pytest.raises(ValueError, match="delta"):
        build_quantizer("ewgs", 4, "weight", init_alpha=3.0)


# ------------------------------------------------------------------ Hessian-based delta update
class Elementwise(nn.Module):
    """Quantized weight and input, each entering the loss elementwise (a diagonal Hessian)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([-0.9, -0.2, 0.3, 0.8]))
        self.weight_quantizer = fixed(2, "weight", -1.0, 1.0, output_scale=0.5, delta=1e-3)
        self.act_quantizer = fixed(2, "activation", 0.0, 1.0, delta=1e-3)
        self.register_buffer("a", torch.tensor([1.0, 2.0, 3.0, 4.0]))
        self.register_buffer("c", torch.tensor([1.0, 1.0, 2.0, 2.0]))


def quadratic_loss(model, x):
    """0.5 sum(a w_q^2) + 0.5 sum(c x_q^2)."""
    w_q = model.weight_quantizer(model.weight)
    x_q = model.act_quantizer(x)
    return 0.5 * (model.a * w_q**2).sum() + 0.5 * (model.c * x_q**2).sum()


def test_update_ewgs_deltas_matches_hand_computed_hessian():
    model = Elementwise()
    batches = [
        torch.tensor([0.1, 0.45, 0.9, 0.2]),
        torch.tensor([0.7, 0.05, 0.4, 1.3]),
        torch.tensor([9.0, 9.0, 9.0, 9.0]),
    ]  # the third is beyond num_batches
    deltas = update_ewgs_deltas(model, quadratic_loss, batches, num_batches=2)

    # weight: x_n = [.05 .4 .65 .9] -> r = [0 1/3 2/3 1], w_q = 0.5 (2r - 1) = [-.5 -1/6 1/6 .5]
    # dL/dr = 2 * 0.5 * a * w_q; d2L/dr2 = 4 * 0.25 * a -> Tr(H)/numel = 10 / 4
    grad_w = torch.tensor([-0.5, -1 / 3, 0.5, 2.0])
    expected_w = 2.5 / (3 * grad_w.std())
    # activation: r = round(3x)/3; dL/dr = c r; d2L/dr2 = c -> Tr(H)/numel = 6 / 4 per batch
    grad_a1 = torch.tensor([1.0, 1.0, 2.0, 2.0]) * torch.tensor([0.0, 1.0, 3.0, 1.0]) / 3
    grad_a2 = torch.tensor([1.0, 1.0, 2.0, 2.0]) * torch.tensor([2.0, 0.0, 1.0, 3.0]) / 3
    expected_a = (1.5 / (3 * grad_a1.std()) + 1.5 / (3 * grad_a2.std())) / 2

    assert deltas["weight_quantizer"] == pytest.approx(float(expected_w), rel=1e-5)
    assert deltas["act_quantizer"] == pytest.approx(float(expected_a), rel=1e-5)
    assert float(model.weight_quantizer.delta) == pytest.approx(float(expected_w), rel=1e-5)
    assert float(model.act_quantizer.delta) == pytest.approx(float(expected_a), rel=1e-5)
    assert model.weight.grad is None and not model.weight_quantizer.keep_rounded


def test_negative_curvature_clips_delta_to_zero():
    model = Elementwise()
    deltas = update_ewgs_deltas(
        model, lambda m, x: -quadratic_loss(m, x), [torch.tensor([0.1, 0.45, 0.9, 0.2])]
    )
    assert deltas == {"weight_quantizer": 0.0, "act_quantizer": 0.0}


def test_update_skips_ste_and_needs_an_ewgs_quantizer():
    model = nn.Module()
    model.q = STEQuantizer(2, "activation")
    with pytest.raises(ValueError, match="no EWGS quantizer"):
        update_ewgs_deltas(model, lambda m, x: m.q(x).pow(2).sum(), [torch.randn(4)])


def test_hutchinson_trace_estimates_a_dense_hessian():
    torch.manual_seed(4)
    matrix = torch.tensor([[3.0, 1.0, 0.5], [1.0, 2.0, -1.0], [0.5, -1.0, 1.0]])
    point = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    (grad,) = torch.autograd.grad(0.5 * point @ matrix @ point, point, create_graph=True)
    assert hutchinson_trace(grad, point, probes=400, tol=0.0) == pytest.approx(6.0, abs=0.4)

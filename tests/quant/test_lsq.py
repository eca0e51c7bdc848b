"""LSQ and LSQ+ quantizers: forward values, Eq. 3 step-size gradients with the 1/sqrt(N Qp)
scale, initialisation, grid, state, and bad input."""

import math

import pytest
import torch

from sqakd.quant import build_quantizer
from sqakd.quant.methods.lsq import LSQPlusQuantizer, LSQQuantizer


def with_step(cls, bits, role, step, offset=None, per_channel=False):
    q = cls(bits, role, per_channel=per_channel)
    q.step_size.data = torch.as_tensor(step, dtype=torch.float32).clone()
    if offset is not None:
        q.offset.data.fill_(offset)
    q.initialized.fill_(True)
    return q


X = torch.tensor([-2.3, -0.6, 0.2, 0.4, 1.3, 3.0])
# s = 0.5: x / s = [-4.6 -1.2 .4 .8 2.6 6]; s = 0.02 (8 bits): [-115 -30 10 20 65 150]
STEP = {1: 0.5, 2: 0.5, 4: 0.5, 8: 0.02}
SIGNED = {
    1: [-0.5, -0.5, 0.5, 0.5, 0.5, 0.5],  # {-s, +s}: sign(x) s
    2: [-1.0, -0.5, 0.0, 0.5, 0.5, 0.5],  # clamp to [-2, 1] -> -2 -1 0 1 1 1
    4: [-2.5, -0.5, 0.0, 0.5, 1.5, 3.0],  # [-8, 7]: -5 -1 0 1 3 6
    8: [-2.3, -0.6, 0.2, 0.4, 1.3, 2.54],  # [-128, 127]: -115 -30 10 20 65 127
}
UNSIGNED = {
    1: [0.0, 0.0, 0.0, 0.5, 0.5, 0.5],  # [0, 1]: 0 0 0 1 1 1
    2: [0.0, 0.0, 0.0, 0.5, 1.5, 1.5],  # [0, 3]: 0 0 0 1 3 3
    4: [0.0, 0.0, 0.0, 0.5, 1.5, 3.0],  # [0, 15]: 0 0 0 1 3 6
    8: [0.0, 0.0, 0.2, 0.4, 1.3, 3.0],  # [0, 255]: 0 0 10 20 65 150
}
# LSQ+ activations, beta = -1: (x + 1) / s = [-2.6 .8 2.4 2.8 4.6 8] (s = .5), [-65 20 60 70 115 200]
PLUS = {
    1: [-1.0, -0.5, -0.5, -0.5, -0.5, -0.5],  # [0, 1]: 0 1 1 1 1 1
    2: [-1.0, -0.5, 0.0, 0.5, 0.5, 0.5],  # [0, 3]: 0 1 2 3 3 3
    4: [-1.0, -0.5, 0.0, 0.5, 1.5, 3.0],  # [0, 15]: 0 1 2 3 5 8
    8: [-1.0, -0.6, 0.2, 0.4, 1.3, 3.0],  # [0, 255]: 0 20 60 70 115 200
}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_forward_matches_hand_computation(bits):
    for cls in (LSQQuantizer, LSQPlusQuantizer):  # LSQ+ weights are LSQ weights
        out = with_step(cls, bits, "weight", STEP[bits])(X)
        torch.testing.assert_close(out, torch.tensor(SIGNED[bits]))
    out = with_step(LSQQuantizer, bits, "activation", STEP[bits])(X)
    torch.testing.assert_close(out, torch.tensor(UNSIGNED[bits]))
    out = with_step(LSQPlusQuantizer, bits, "activation", STEP[bits], offset=-1.0)(X)
    torch.testing.assert_close(out, torch.tensor(PLUS[bits]))


@pytest.mark.parametrize("method", ["lsq", "lsq+"])
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_at_most_two_to_the_bits_levels(bits, role, method):
    torch.manual_seed(0)
    x = torch.randn(20000)
    levels = build_quantizer(method, bits, role)(x).unique().numel()
    assert levels <= 2**bits
    if bits <= 2:
        assert levels == 2**bits


@pytest.mark.parametrize("method", ["lsq", "lsq+"])
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_idempotent(bits, role, method):
    torch.manual_seed(1)
    q = build_quantizer(method, bits, role)
    once = q(torch.randn(1000))
    torch.testing.assert_close(q(once), once)
    codes = q.codes(once)
    torch.testing.assert_close(q.codes(q.grid().dequantize(codes)), codes)


def test_weight_step_gradient_is_eq3_with_gradient_scale():
    x = X.clone().requires_grad_(True)
    q = with_step(LSQQuantizer, 2, "weight", 0.5)  # Qn = 2, Qp = 1
    q(x).backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    # dv/ds: -Qn | 1.2 - 1 | -.4 + 0 | -.8 + 1 | Qp | Qp = -2 .2 -.4 .2 1 1
    # sum g * dv/ds = -2 + .4 - 1.2 + .8 + 5 + 6 = 9; scale 1 / sqrt(N Qp) = 1 / sqrt(6)
    torch.testing.assert_close(q.step_size.grad, torch.tensor(9.0 / math.sqrt(6.0)))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 0.0]))


def test_activation_step_gradient_uses_features_per_example():
    x = X.reshape(2, 3)
    q = with_step(LSQQuantizer, 2, "activation", 0.5)  # Qn = 0, Qp = 3, N = 3
    q(x).backward(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    # dv/ds: 0 (clamped low) | 0 | -.4 | .2 | -2.6 + 3 = .4 | Qp = 3
    # sum = -1.2 + .8 + 2 + 18 = 19.6; scale 1 / sqrt(3 * 3)
    torch.testing.assert_close(q.step_size.grad, torch.tensor(19.6 / 3))


def test_binary_weight_step_gradient():
    x = torch.tensor([-0.8, -0.2, 0.3, 0.6])
    q = with_step(LSQQuantizer, 1, "weight", 0.5)
    out = q(x)
    torch.testing.assert_close(out, torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    out.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # dv/ds = sign(x) - x/s inside |x| <= s, sign(x) outside: -1 -.6 .4 1; sum = 3; g = 1/sqrt(4)
    torch.testing.assert_close(q.step_size.grad, torch.tensor(1.5))


def test_per_channel_step_sizes_and_gradients():
    w = X.reshape(2, 3).clone()
    q = with_step(LSQQuantizer, 2, "weight", [0.5, 0.25], per_channel=True)
    q(w).backward(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    # row 0 (s=.5): -2 .2 -.4 -> -2.8; row 1 (s=.25): x/s = 1.6 5.2 12, all clamped -> 15
    # N = 3 elements per channel, Qp = 1
    torch.testing.assert_close(q.step_size.grad, torch.tensor([-2.8, 15.0]) / math.sqrt(3.0))
    torch.testing.assert_close(q(w)[1], torch.tensor([0.25, 0.25, 0.25]))


def test_lsq_initialisation():
    w = torch.tensor([1.0, -1.0, 1.0, -1.0]).repeat(3, 1) * torch.tensor([[1.0], [2.0], [4.0]])
    per_channel = LSQQuantizer(4, "weight", per_channel=True)
    per_channel(w)  # s = 2 mean|x| / sqrt(Qp), Qp = 7
    torch.testing.assert_close(
        per_channel.step_size.detach(), torch.tensor([2.0, 4.0, 8.0]) / 7**0.5
    )
    per_tensor = LSQQuantizer(4, "weight")
    per_tensor(w)
    torch.testing.assert_close(per_tensor.step_size.detach(), torch.tensor(2 * 7 / 3 / 7**0.5))
    binary = LSQQuantizer(1, "weight")
    binary(w)  # s = mean|x| for sign(x) * s
    torch.testing.assert_close(binary.step_size.detach(), torch.tensor(7 / 3))
    act = LSQQuantizer(2, "activation")
    act(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # Qp = 3: s = 2 * 1.5 / sqrt(3)
    torch.testing.assert_close(act.step_size.detach(), torch.tensor(3 / 3**0.5))


def test_lsq_plus_initialisation():
    act = LSQPlusQuantizer(2, "activation")
    act(torch.tensor([-0.6, 0.2, 1.5]))  # s = (max - min) / 3, beta = min
    torch.testing.assert_close(act.step_size.detach(), torch.tensor(0.7))
    torch.testing.assert_close(act.offset.detach(), torch.tensor(-0.6))
    weight = LSQPlusQuantizer(4, "weight")
    weight(torch.tensor([0.6, -0.4, 0.6, -0.4]))
    # mu = .1, sigma = .5 sqrt(4/3): s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^3
    torch.testing.assert_close(weight.step_size.detach(), torch.tensor((0.1 + 3**0.5) / 8))


def test_lsq_plus_offset_gradient():
    x = X.reshape(1, 6)
    q = with_step(LSQPlusQuantizer, 2, "activation", 0.5, offset=-1.0)
    q(x).backward(torch.arange(1.0, 7.0).reshape(1, 6))
    # (x - beta) / s = -2.6 .8 2.4 2.8 4.6 8: d v / d beta = 1 where clamped -> 1 + 5 + 6;
    # d v / d s = 0 | .2 | -.4 | .2 | 3 | 3 -> .4 - 1.2 + .8 + 15 + 18 = 33; scale 1/sqrt(6 * 3)
    torch.testing.assert_close(q.offset.grad, torch.tensor(12.0 / 18**0.5))
    torch.testing.assert_close(q.step_size.grad, torch.tensor(33.0 / 18**0.5))
    grid = q.grid()
    assert grid.qmin == 0 and grid.qmax == 3
    torch.testing.assert_close(grid.zero_point, torch.tensor(2.0))  # -beta / s


@pytest.mark.parametrize("method", ["lsq", "lsq+"])
@pytest.mark.parametrize(
    "role,bits,per_channel",
    [("weight", 3, False), ("weight", 3, True), ("weight", 1, True), ("activation", 3, False)],
)
def test_state_dict_round_trip(method, role, bits, per_channel):
    torch.manual_seed(2)
    x = torch.randn(4, 6)
    q = build_quantizer(method, bits, role, per_channel=per_channel)
    q(x)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.05)
    fresh = build_quantizer(method, bits, role, per_channel=per_channel)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lsq", "lsq+"])
@pytest.mark.parametrize(
    "role,bits,per_channel",
    [
        ("weight", 4, False),
        ("weight", 4, True),
        ("weight", 1, False),
        ("weight", 1, True),
        ("activation", 4, False),
        ("activation", 1, False),
    ],
)
def test_grid_dequantize_codes_equals_forward(method, role, bits, per_channel):
    torch.manual_seed(3)
    x = torch.randn(5, 8)
    q = build_quantizer(method, bits, role, per_channel=per_channel)
    out = q(x)
    torch.testing.assert_close(q.grid().dequantize(q.codes(x)), out)


@pytest.mark.parametrize("cls", [LSQQuantizer, LSQPlusQuantizer])
@pytest.mark.parametrize(
    "kwargs", [dict(bits=0), dict(bits=9), dict(bits=4, role="activation", per_channel=True)]
)
def test_bad_arguments_raise(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_lsq_plus_rejects_signed_activations():
    with pytest.raises(ValueError, match="offset"):
        LSQPlusQuantizer(4, "activation", signed=True)


@pytest.mark.parametrize("method", ["lsq", "lsq+"])
def test_unknown_option_raises(method):
    with pytest.raises(ValueError, match="unknown option"):
        build_quantizer(method, 4, "weight", delta=0.1)

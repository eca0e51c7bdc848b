"""Integer forms of grids: containers, doubled half-integer zero points, activation shifts; and
quant stands below export (it never imports it)."""

import subprocess
import sys

import pytest
import torch

from sqakd.quant import QuantGrid, build_quantizer
from sqakd.quant.deployed import weight_codes
from sqakd.quant.grid import activation_form, codes_of_values, pick_container, weight_form


def grid(bits, qmin, qmax, scale, zero, in_scale=None, in_zero=None, axis=None, levels=None):
    t = torch.tensor
    return QuantGrid(
        bits, qmin, qmax, t(scale), t(zero),
        t(scale if in_scale is None else in_scale), t(zero if in_zero is None else in_zero),
        axis, None if levels is None else t(levels),
    )  # fmt: skip


def test_pick_container_takes_the_first_that_fits():
    assert pick_container(-15, 15, ("int8", "uint8", "int16")) == "int8"
    assert pick_container(0, 255, ("int8", "uint8", "int16")) == "uint8"
    assert pick_container(-255, 255, ("int8", "uint8", "int16")) == "int16"
    assert pick_container(0, 15, ("uint8", "int8")) == "uint8"
    assert pick_container(-40000, 0, ("int8", "uint8", "int16")) is None


def test_integer_zero_point_keeps_the_codes():
    codes = torch.tensor([-8.0, -1.0, 0.0, 7.0])
    form = weight_form(codes, grid(4, -8, 7, 0.25, 0.0))
    assert form.container == "int8" and not form.doubled
    assert form.codes.dtype == torch.int8 and form.codes.tolist() == [-8, -1, 0, 7]
    torch.testing.assert_close(form.dequantize(), torch.tensor([-2.0, -0.25, 0.0, 1.75]))


def test_half_integer_zero_point_doubles_the_codes():
    # EWGS 2-bit: value = 0.4 * (q - 1.5) for q in 0..3 -> codes' = 2q - 3, scale 0.2
    form = weight_form(torch.tensor([0.0, 1.0, 2.0, 3.0]), grid(2, 0, 3, 0.4, 1.5))
    assert form.doubled and form.container == "int8"
    assert form.codes.tolist() == [-3, -1, 1, 3] and form.zero_point.item() == 0
    assert form.scale.item() == pytest.approx(0.2)
    torch.testing.assert_close(form.dequantize(), torch.tensor([-0.6, -0.2, 0.2, 0.6]))


def test_eight_bit_half_integer_zero_point_needs_int16():
    form = weight_form(torch.tensor([0.0, 255.0]), grid(8, 0, 255, 1.0, 127.5))
    assert form.container == "int16" and form.codes.tolist() == [-255, 255]


def test_per_channel_half_integer_zero_points():
    codes = torch.tensor([[0.0, 3.0], [1.0, 2.0]])
    g = grid(2, 0, 3, [1.0, 2.0], [1.5, 1.5], axis=0)
    form = weight_form(codes, g)
    assert form.axis == 0 and form.codes.tolist() == [[-3, 3], [-1, 1]]
    torch.testing.assert_close(form.dequantize(), g.dequantize(codes))


def test_levels_have_no_integer_form():
    assert "non-uniform" in weight_form(
        torch.tensor([0.0]), grid(2, 0, 3, 1.0, 0.0, levels=[0.0, 0.1, 0.2, 0.4])
    )


def test_activation_fractional_zero_point_becomes_a_shift_and_a_clip():
    # code = clamp(round(x / 0.1 + 2.3), 0, 15); value = (code - 0) / 15
    form = activation_form(grid(4, 0, 15, 1 / 15, 0.0, in_scale=0.1, in_zero=2.3))
    assert form.container == "uint8" and form.q_zero_point.item() == 2
    assert form.pre_shift == pytest.approx(0.03) and form.post_shift == 0
    assert form.clip == pytest.approx((-0.2, 1.3))
    x = torch.tensor([-1.0, -0.2, 0.0, 0.07, 0.5, 1.27, 2.0])
    shifted = torch.clamp(x + form.pre_shift, *form.clip)
    codes = torch.round(shifted / form.q_scale) + form.q_zero_point
    expected = torch.clamp(torch.round(x / 0.1 + 2.3), 0, 15)
    assert torch.equal(codes, expected)


def test_activation_fractional_output_zero_point_becomes_a_post_shift():
    # LSQ+: value = 0.5 * (code + 0.4) -> DequantizeLinear(zero point 0) then + 0.2
    form = activation_form(grid(8, 0, 255, 0.5, -0.4))
    assert form.clip is None  # 0..255 is the whole uint8 range
    assert form.dq_zero_point.item() == 0 and form.post_shift == pytest.approx(0.2)


def test_codes_of_values_inverts_uniform_and_level_grids():
    g = grid(3, -4, 3, 0.5, 0.0)
    assert codes_of_values(torch.tensor([-2.0, -0.5, 1.5, 9.0]), g).tolist() == [-4, -1, 3, 3]
    levels = grid(2, 0, 3, 1.0, 0.0, levels=[-1.0, -0.25, 0.25, 1.0])
    assert codes_of_values(torch.tensor([0.25, -1.0, 1.0]), levels).tolist() == [2, 0, 3]


@pytest.mark.parametrize("method", ["ewgs", "lsq", "dorefa"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_codes_dequantize_to_the_forward(method, bits):
    torch.manual_seed(1)
    quantizer = build_quantizer(method, bits, "weight")
    weight = torch.randn(8, 4, 3, 3)
    quantizer.calibrate(weight)
    codes, values = weight_codes(quantizer, weight)
    g = quantizer.grid()
    assert torch.all(codes == codes.round()) and g.qmin <= codes.min() and codes.max() <= g.qmax
    torch.testing.assert_close(g.dequantize(codes), values, rtol=0, atol=1e-6)
    torch.testing.assert_close(values, quantizer(weight))


def test_weight_codes_reject_a_grid_that_does_not_describe_the_forward():
    quantizer = build_quantizer("lsq", 4, "weight")
    weight = torch.randn(4, 4)
    quantizer.calibrate(weight)
    quantizer.grid = lambda: grid(4, -8, 7, 3 * float(quantizer.step_size), 0.0)  # wrong scale
    with pytest.raises(ValueError, match="grid"):
        weight_codes(quantizer, weight)


def test_other_fractional_zero_point_keeps_codes_and_adds_an_offset():
    # DSQ-like grid: value = 0.5 * (q - 2.3) = 0.5 * (q - 2) - 0.15
    codes = torch.tensor([0.0, 2.0, 3.0, 15.0])
    form = weight_form(codes, grid(4, 0, 15, 0.5, 2.3))
    assert not form.doubled and form.codes.tolist() == [0, 2, 3, 15] and form.zero_point.item() == 2
    assert form.offset.item() == pytest.approx(-0.15)
    torch.testing.assert_close(form.dequantize(), 0.5 * (codes - 2.3))


def test_quant_imports_nothing_from_export():
    """The integer forms live in quant; export builds on them, never the other way round."""
    code = (
        "import sys, sqakd.quant, sqakd.quant.deployed, sqakd.quant.grid; "
        "print(sorted(m for m in sys.modules if m.startswith('sqakd.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert "sqakd.quant" in loaded
    assert "sqakd.export" not in loaded


def test_the_earlier_export_path_names_the_same_functions():
    from sqakd.export import integer
    from sqakd.quant import deployed, grid

    assert integer.weight_form is grid.weight_form
    assert integer.activation_form is grid.activation_form
    assert integer.weight_codes is deployed.weight_codes
    assert integer.check_calibrated is deployed.check_calibrated

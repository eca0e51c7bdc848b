"""Integer grids and their integer forms: the arithmetic that quantized inference in PyTorch,
the ONNX export and the packed format share.

A quantizer reports its grid (:class:`QuantGrid`): ``value = scale * (code -
zero_point)`` for uniform grids, ``value = levels[code - qmin]`` otherwise. Deployment formats
want integer codes and an integer zero point in a fixed container type (int8, uint8, int16). This
module turns a layer's grid into that form, exactly (:func:`weight_form`,
:func:`activation_form`; :mod:`sqakd.quant.deployed` applies them to a quantizer):

* **weight codes** are the codes the fake-quantized forward computes with: ``quantizer.codes(w)``,
  where each is checked against the forward's own output ``v = quantizer(w)`` through
  ``code = round(v / scale + zero_point)`` (nearest level for non-uniform grids); the rare code
  that ``codes()`` puts on the other side of a rounding tie is taken from the forward;
* a **half-integer weight zero point** (EWGS and DoReFa: ``value = scale * (code - n/2)``) is
  carried as doubled codes ``2 code - 2 zero_point`` with ``scale / 2`` and zero point 0, which
  fit int8 up to 7 bits and int16 at 8 bits; any other fractional zero point ``z = zi + zf``
  (DSQ after training) keeps the codes with the integer ``zi`` and adds the float constant
  ``offset = -zf * scale`` (per channel) to the dequantized weight;
* an **activation zero point** ``z = zi + zf`` (``zi`` an integer in the container's range) is
  carried as the integer ``zi`` plus a float shift: quantize ``x + zf * input_scale`` with zero
  point ``zi``, and add ``-zf * scale`` after dequantizing when the output zero point is
  fractional. Codes outside ``qmin..qmax`` are prevented by clipping ``x`` to
  ``[(qmin - zi) * input_scale, (qmax - zi) * input_scale]`` before quantizing when the container
  is wider than the grid (e.g. 4-bit codes in uint8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .integer_sums import IntegerWeight


@dataclass(frozen=True)
class QuantGrid:
    """The integer grid a quantizer uses, in the form deployment needs.

    Quantize: ``code = clamp(round(x / input_scale + input_zero_point), qmin, qmax)``.
    Dequantize: ``value = scale * (code - zero_point)`` for uniform grids, or
    ``value = levels[code - qmin]`` for non-uniform ones (``levels`` is not ``None``).

    ``scale``/``zero_point`` (and the input pair) are 0-d tensors for per-tensor grids or 1-d
    tensors of length C for per-channel grids along ``axis``. Zero points may be fractional
    (EWGS and DoReFa map weights onto an odd number of symmetric levels); export decides how to
    carry them. For weights, :meth:`sqakd.quant.Quantizer.codes` gives the integer codes directly, so the
    input pair matters only for activations.
    """

    bits: int
    qmin: int
    qmax: int
    scale: Tensor
    zero_point: Tensor
    input_scale: Tensor
    input_zero_point: Tensor
    axis: int | None = None
    levels: Tensor | None = None

    @property
    def uniform(self) -> bool:
        return self.levels is None

    def dequantize(self, codes: Tensor) -> Tensor:
        """Map integer codes back to the float values the fake-quantized model computes with."""
        if self.levels is not None:
            index = codes.long() - self.qmin
            if self.levels.dim() == 1:
                return self.levels[index]
            return _gather_levels(self.levels, index, self.axis or 0)
        axis = self.axis or 0
        scale = broadcast_channels(self.scale, codes, axis)
        zero_point = broadcast_channels(self.zero_point, codes, axis)
        return scale * (codes.to(self.scale.dtype) - zero_point)


def _gather_levels(levels: Tensor, index: Tensor, axis: int) -> Tensor:
    """Per-channel level tables: ``levels`` is (C, L); pick each element's level in its channel."""
    moved = index.movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    picked = torch.gather(levels, 1, flat).reshape(moved.shape)
    return picked.movedim(0, axis)


def broadcast_channels(value: Tensor, like: Tensor, axis: int) -> Tensor:
    """Reshape a per-channel vector (C,) so that it broadcasts against ``like`` along ``axis``."""
    if value.dim() == 0:
        return value
    shape = [1] * like.dim()
    shape[axis] = -1
    return value.reshape(shape)


#: integer container -> (lowest, highest, torch dtype)
CONTAINERS: dict[str, tuple[int, int, torch.dtype]] = {
    "int8": (-128, 127, torch.int8),
    "uint8": (0, 255, torch.uint8),
    "int16": (-32768, 32767, torch.int16),
}
WEIGHT_CONTAINERS = ("int8", "uint8", "int16")
ACTIVATION_CONTAINERS = ("uint8", "int8", "int16")


def pick_container(low: int, high: int, preference: tuple[str, ...]) -> str | None:
    """The first container in ``preference`` that holds every integer in ``low..high``."""
    for name in preference:
        lowest, highest, _ = CONTAINERS[name]
        if lowest <= low and high <= highest:
            return name
    return None


def codes_of_values(values: Tensor, grid: QuantGrid) -> Tensor:
    """Invert the dequantization: the integer codes (as floats) whose grid values are ``values``."""
    if grid.levels is not None:
        return _nearest_level(values, grid) + grid.qmin
    axis = grid.axis or 0
    scale = broadcast_channels(grid.scale, values, axis)
    zero_point = broadcast_channels(grid.zero_point, values, axis)
    return torch.clamp(torch.round(values / scale + zero_point), grid.qmin, grid.qmax)


def _nearest_level(values: Tensor, grid: QuantGrid) -> Tensor:
    levels = grid.levels
    assert levels is not None
    if levels.dim() == 1:
        return (values.unsqueeze(-1) - levels).abs().argmin(dim=-1).to(values.dtype)
    axis = grid.axis or 0
    moved = values.movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1, 1)
    index = (flat - levels.unsqueeze(1)).abs().argmin(dim=-1)
    return index.reshape(moved.shape).movedim(0, axis).to(values.dtype)


def integer_weight(form: WeightForm, dtype: torch.dtype) -> IntegerWeight:
    """``form`` as ``codes - zero_point`` (integer-valued, as ``dtype``), scale and offset."""
    zero_point = broadcast_channels(form.zero_point, form.codes, form.axis or 0)
    integer = (form.codes.float() - zero_point.float()).to(dtype)
    offset = None if form.offset is None else form.offset.to(dtype)
    return IntegerWeight(integer, form.scale.to(dtype), offset)


@dataclass(frozen=True)
class WeightForm:
    """A weight as integer codes: ``value = scale * (codes - zero_point) + offset`` along
    ``axis`` (``offset`` is ``None`` unless the grid's zero point is neither whole nor half)."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    axis: int | None
    container: str
    doubled: bool
    offset: Tensor | None = None

    def dequantize(self) -> Tensor:
        axis = self.axis or 0
        scale = broadcast_channels(self.scale, self.codes, axis)
        zero_point = broadcast_channels(self.zero_point, self.codes, axis)
        value = (self.codes.float() - zero_point.float()) * scale
        if self.offset is not None:
            value = value + broadcast_channels(self.offset, self.codes, axis)
        return value


def weight_form(codes: Tensor, grid: QuantGrid) -> WeightForm | str:
    """The integer form of weight ``codes`` on ``grid``, or the reason there is none."""
    if grid.levels is not None:
        return "non-uniform levels"
    zero_point = grid.zero_point.double()
    scale = grid.scale.double()
    if zero_point.dim() < scale.dim():
        zero_point = zero_point.expand_as(scale)
    offset = None
    whole = bool(torch.all(zero_point == zero_point.round()))
    doubled = not whole and bool(torch.all(2 * zero_point == (2 * zero_point).round()))
    if doubled:
        axis = grid.axis or 0
        codes = 2 * codes.double() - broadcast_channels(2 * zero_point, codes, axis)
        zero_point, scale = torch.zeros_like(zero_point), scale / 2
    low, high = int(codes.min()), int(codes.max())
    if whole or doubled:  # the zero point is stored as it is, in the codes' container
        low, high = min(low, int(zero_point.min())), max(high, int(zero_point.max()))
    container = pick_container(low, high, WEIGHT_CONTAINERS)
    if container is None:
        return f"codes {low}..{high} do not fit a 16-bit integer"
    lowest, highest, dtype = CONTAINERS[container]
    if not whole and not doubled:
        integer = zero_point.round().clamp(lowest, highest)
        offset = (-(zero_point - integer) * scale).float()
        zero_point = integer
    return WeightForm(
        codes=codes.round().to(dtype),
        scale=scale.float(),
        zero_point=zero_point.round().to(dtype),
        axis=grid.axis if grid.scale.dim() > 0 else None,
        container=container,
        doubled=doubled,
        offset=offset,
    )


@dataclass(frozen=True)
class ActivationForm:
    """An activation quantizer as ``x -> clip(x + pre_shift) -> QuantizeLinear(q_scale,
    q_zero_point) -> DequantizeLinear(dq_scale, dq_zero_point) -> + post_shift``."""

    q_scale: Tensor
    q_zero_point: Tensor
    pre_shift: float
    clip: tuple[float, float] | None
    dq_scale: Tensor
    dq_zero_point: Tensor
    post_shift: float
    container: str


def activation_form(grid: QuantGrid) -> ActivationForm | str:
    """The QuantizeLinear/DequantizeLinear form of an activation grid, or why there is none."""
    if grid.levels is not None:
        return "non-uniform levels"
    if grid.input_scale.dim() > 0 or grid.scale.dim() > 0:
        return "per-channel activation grid"
    container = pick_container(grid.qmin, grid.qmax, ACTIVATION_CONTAINERS)
    if container is None:
        return f"codes {grid.qmin}..{grid.qmax} do not fit a 16-bit integer"
    lowest, highest, dtype = CONTAINERS[container]
    in_scale, in_zero = float(grid.input_scale), float(grid.input_zero_point)
    out_scale, out_zero = float(grid.scale), float(grid.zero_point)
    if not in_scale > 0 or not out_scale > 0:
        return f"non-positive scale (input {in_scale:.3g}, output {out_scale:.3g})"
    in_int = min(max(round(in_zero), lowest), highest)
    out_int = min(max(round(out_zero), lowest), highest)
    clip = None
    if (grid.qmin, grid.qmax) != (lowest, highest):
        clip = ((grid.qmin - in_int) * in_scale, (grid.qmax - in_int) * in_scale)
    return ActivationForm(
        q_scale=torch.tensor(in_scale, dtype=torch.float32),
        q_zero_point=torch.tensor(in_int, dtype=dtype),
        pre_shift=(in_zero - in_int) * in_scale,
        clip=clip,
        dq_scale=torch.tensor(out_scale, dtype=torch.float32),
        dq_zero_point=torch.tensor(out_int, dtype=dtype),
        post_shift=-(out_zero - out_int) * out_scale,
        container=container,
    )

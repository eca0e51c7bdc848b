"""A quantizer's weight as deployment computes it: the integer codes the fake-quantized forward
uses, checked against that forward, and the weight rebuilt from its integer form (see
:mod:`sqakd.quant.grid`) operation for operation like ONNX ``DequantizeLinear``. Quantized layers
multiply by it in inference; the ONNX export and the packed format store it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import Quantizer
from .grid import QuantGrid, broadcast_channels, codes_of_values, integer_weight, weight_form
from .integer_sums import IntegerWeight

if TYPE_CHECKING:
    from .layers import QuantizedLayer


def check_calibrated(name: str, layer: QuantizedLayer) -> None:
    """Raise a one-line ``ValueError`` if ``layer``'s quantizers have not seen data yet."""
    quantizers = [q for q in (layer.weight_quantizer, layer.act_quantizer) if q is not None]
    if not bool(layer.calibrated) or not all(q.is_initialized for q in quantizers):
        raise ValueError(
            f"quantized layer {name!r} is not calibrated; run sqakd.quant.calibrate(model, "
            f"batches) (or one forward pass on real images) before exporting or packing"
        )


@torch.no_grad()
def weight_codes(quantizer: Quantizer, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes, values)``: the integer codes (float dtype) of ``weight`` that the fake-quantized
    forward uses, and that forward's output ``values = quantizer(weight)``.

    Raises ``ValueError`` when the quantizer's grid does not describe its forward (a method bug).
    """
    values = quantizer(weight).detach()
    grid = quantizer.grid()
    codes = quantizer.codes(weight).detach().to(values.dtype)
    from_forward = codes_of_values(values, grid)
    codes = torch.where(codes == from_forward, codes, from_forward)
    rebuilt = grid.dequantize(codes)
    spacing = _level_spacing(grid, values)
    if not torch.all((rebuilt - values).abs() <= 1e-3 * spacing + 1e-6 * values.abs()):
        raise ValueError(
            f"the {quantizer.method!r} quantizer's grid() does not reproduce its forward on this "
            f"weight (largest gap {float((rebuilt - values).abs().max()):.3g}); fix grid() of "
            f"that method"
        )
    return codes, values


@torch.no_grad()
def deployed_weight(quantizer: Quantizer, weight: Tensor) -> tuple[Tensor, IntegerWeight | None]:
    """``(values, integer)``: ``weight`` quantized as the exported model computes it, ``(codes -
    zero_point) * scale [+ offset]`` from its :class:`~sqakd.quant.grid.WeightForm`, operation
    for operation like ONNX ``DequantizeLinear`` (the forward's own values where the grid has no
    integer form); and the same as :class:`~sqakd.quant.integer_sums.IntegerWeight`, or ``None`` when there is no
    integer form (non-uniform levels)."""
    codes, values = weight_codes(quantizer, weight)
    form = weight_form(codes, quantizer.grid())
    if isinstance(form, str):
        return values, None
    return form.dequantize().to(values.dtype), integer_weight(form, values.dtype)


def _level_spacing(grid: QuantGrid, like: Tensor) -> Tensor:
    if grid.levels is None:
        return broadcast_channels(grid.scale.abs(), like, grid.axis or 0)
    gaps = grid.levels.diff(dim=-1).abs()
    smallest = gaps[gaps > 0].min() if bool((gaps > 0).any()) else torch.tensor(1.0)
    return smallest

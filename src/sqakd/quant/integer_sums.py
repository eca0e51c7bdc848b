"""Integer sums: a quantized layer's op computed on integer codes, exact in float32.

A quantized layer multiplies an input ``x = s * X + c`` (integer-valued codes ``X``, scale ``s``,
shift ``c``: the fractional part of the activation's output zero point, DSQ and LSQ+) by a
weight ``w = t * W + o`` (integer-valued codes ``W``, scale ``t`` and offset ``o`` per output
channel: the fractional part of the weight's zero point, DSQ after training). The op (a
convolution, a matrix product) is bilinear, so::

    op(x, w) =  s t * op(X, W)          the codes
              + c t * op(M, W)          the input shift (M: ones where x is, zeros in the padding)
              + s o * window(X)         the weight offset (window: op with an all-ones kernel)
              + c o * window(M)

Every ``op`` and ``window`` term sums integers (below 2^24), which float32 does exactly in any
order, so the result depends only on the few element-wise products and additions that follow,
taken in the fixed order above. PyTorch's eval forward
(:meth:`sqakd.quant.QuantizedLayer.integer_forward`) and the exported graph
(:mod:`sqakd.export.view`) both call :func:`integer_sums` with constants from
:func:`sum_constants`, so the two runtimes agree bit for bit. The padding mask ``M`` is what
makes the shift term right at the borders: a convolution pads the *quantized* input with zeros,
not with ``c``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

#: ``op(x, w)``: the layer's convolution or matrix product, without bias
Op = Callable[[Tensor, Tensor], Tensor]
#: ``window(t)``: ``t`` summed over each output's receptive field (every input channel of its
#: group), broadcastable over the output channels: the op with an all-ones kernel
Window = Callable[[Tensor], Tensor]


class IntegerInput(NamedTuple):
    """An activation as ``codes * scale + shift`` (``codes`` integer-valued floats, 0-d scale)."""

    codes: Tensor
    scale: Tensor
    shift: float


class IntegerWeight(NamedTuple):
    """A weight as ``codes * scale + offset`` (``codes`` integer-valued floats; ``scale`` and
    ``offset`` 0-d or one per output channel; ``offset`` ``None`` when the zero point is whole)."""

    codes: Tensor
    scale: Tensor
    offset: Tensor | None


@dataclass(frozen=True)
class SumConstants:
    """The float32 multipliers of the four terms, shaped to broadcast over the op's output
    (``None`` for a term that is absent)."""

    codes: Tensor
    input_shift: Tensor | None
    weight_offset: Tensor | None
    shift_offset: Tensor | None


def channel_shaped(value: Tensor | None, spatial_dims: int) -> Tensor | None:
    """A 0-d or per-output-channel ``value`` shaped to broadcast over an output whose channel
    axis is followed by ``spatial_dims`` axes (2 for a 2-d convolution, 0 for a linear layer,
    whatever the input's leading dimensions)."""
    if value is None or value.dim() == 0:
        return value
    return value.reshape([-1] + [1] * spatial_dims)


def sum_constants(
    input_scale: Tensor, input_shift: float, weight: IntegerWeight, spatial_dims: int
) -> SumConstants:
    """The multipliers ``s t``, ``c t``, ``s o`` and ``c o``, shaped by :func:`channel_shaped`."""

    def shaped(value: Tensor) -> Tensor:
        return channel_shaped(value, spatial_dims)  # type: ignore[return-value]

    shift = torch.tensor(input_shift, dtype=input_scale.dtype) if input_shift else None
    offset = weight.offset
    return SumConstants(
        codes=shaped(input_scale * weight.scale),
        input_shift=None if shift is None else shaped(shift * weight.scale),
        weight_offset=None if offset is None else shaped(input_scale * offset),
        shift_offset=None if shift is None or offset is None else shaped(shift * offset),
    )


def integer_sums(
    op: Op,
    window: Window,
    x_codes: Tensor,
    w_codes: Tensor,
    constants: SumConstants,
    bias: Tensor | None,
) -> Tensor:
    """``op(x, w) + bias`` from integer codes, term by term as the module docstring writes it
    (``window`` is only called when the weight has an offset; ``bias`` shaped by
    :func:`channel_shaped`)."""
    out = op(x_codes, w_codes) * constants.codes
    mask = torch.ones_like(x_codes[:1]) if constants.input_shift is not None else None
    if mask is not None:
        out = out + op(mask, w_codes) * constants.input_shift
    if constants.weight_offset is not None:
        out = out + window(x_codes) * constants.weight_offset
        if mask is not None:
            out = out + window(mask) * constants.shift_offset
    return out if bias is None else out + bias


def window_kernel(weight: Tensor, groups: int = 1) -> Tensor:
    """The all-ones kernel of a convolution's window sums: one output channel per group,
    ``(groups, in_channels / groups, *kernel_size)``."""
    return weight.new_ones((groups, *weight.shape[1:]))


def expand_groups(sums: Tensor, out_channels: int) -> Tensor:
    """Window sums with one channel per group, ``(N, groups, ...)``, repeated to one per output
    channel (unchanged when they broadcast already: one group, or one output per group)."""
    groups = sums.shape[1]
    if groups in (1, out_channels):
        return sums
    return sums.repeat_interleave(out_channels // groups, dim=1)

"""Min/max asymmetric affine quantizer, the one the zero-shot methods (GDFQ and its successors) use.

With ``n = 2**b - 1`` and a range ``[lo, hi]`` widened to contain 0::

    scale      = (hi - lo) / n
    zero_point = clamp(round(-lo / scale), 0, n)             # an integer: exact ONNX QDQ export
    code       = clamp(round(x / scale + zero_point), 0, n)
    out        = scale * (code - zero_point)

Backward: the straight-through estimator, ``d out / d x = 1`` everywhere (as in GDFQ's released
code; the range gets no gradient).

Ranges. Weights: the current weight's min/max at every forward (per output channel with
``per_channel``), so the range follows training. Activations: an exponential moving average of
each batch's min/max, ``r <- momentum * r + (1 - momentum) * batch``, starting from the first
batch and updated only in training mode while not frozen (:meth:`freeze`). GDFQ and AdaDFQ use
momentum 0.9 (their released code also divides the stored value by ``1 - 0.9**t`` each step; we
use the plain average started from the first batch, which is what that factor aims at).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import (
    QuantGrid,
    Quantizer,
    RangeKind,
    Role,
    broadcast_channels,
    per_channel_reduce,
)
from ..registry import register_quantizer

MIN_SCALE = 1e-8


@register_quantizer("minmax")
class MinMaxQuantizer(Quantizer):
    """Asymmetric affine quantizer on an observed min/max range (EMA-tracked for activations).

    Args:
        momentum: EMA momentum of the activation range, in [0, 1) (0 = last batch only).
    """

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
        momentum: float = 0.9,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"minmax momentum must be in [0, 1), got {momentum}; try 0.9")
        self.momentum = momentum
        self.register_buffer("min_value", torch.tensor(0.0))
        self.register_buffer("max_value", torch.tensor(0.0))
        self.register_buffer("frozen", torch.tensor(False))

    @property
    def num_steps(self) -> int:
        return self.levels_count - 1

    def freeze(self) -> None:
        """Stop updating the activation range (weights always follow the current weight)."""
        self.frozen.fill_(True)

    def unfreeze(self) -> None:
        self.frozen.fill_(False)

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.per_channel:
            axis = self.channel_axis
            return per_channel_reduce(x, axis, "amin"), per_channel_reduce(x, axis, "amax")
        return x.detach().min(), x.detach().max()

    def initialize(self, x: Tensor) -> None:
        self.min_value, self.max_value = (v.clone() for v in self._batch_range(x))

    @property
    def range_kind(self) -> RangeKind | None:
        """Activations: the starting range of the moving average; weights take none (their
        range is the current weight's min/max at every forward)."""
        return "asymmetric" if self.role == "activation" else None

    def set_range(self, low: Tensor, high: Tensor) -> None:
        if self.role != "activation":
            return super().set_range(low, high)
        self.min_value, self.max_value = low.clone(), high.clone()

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the range from ``x``: replaced for weights, averaged for activations."""
        low, high = self._batch_range(x)
        if self.role == "weight":
            self.min_value, self.max_value = low, high
        elif self.training and not bool(self.frozen):
            self.min_value.mul_(self.momentum).add_((1 - self.momentum) * low)
            self.max_value.mul_(self.momentum).add_((1 - self.momentum) * high)

    def scale_and_zero_point(self) -> tuple[Tensor, Tensor]:
        low = self.min_value.clamp(max=0.0)
        high = self.max_value.clamp(min=0.0)
        scale = ((high - low) / self.num_steps).clamp_min(MIN_SCALE)
        zero_point = torch.round(-low / scale).clamp(0, self.num_steps)
        return scale, zero_point

    def quantize(self, x: Tensor) -> Tensor:
        self.observe(x)
        scale, zero_point = (
            broadcast_channels(t, x, self.channel_axis) for t in self.scale_and_zero_point()
        )
        codes = torch.clamp(torch.round(x.detach() / scale + zero_point), 0, self.num_steps)
        return (scale * (codes - zero_point)).detach() + (x - x.detach())

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        scale, zero_point = self.scale_and_zero_point()
        axis = self.channel_axis if self.per_channel else None
        n = self.num_steps
        return QuantGrid(
            self.bits, 0, n, scale, zero_point, scale.clone(), zero_point.clone(), axis
        )

"""FAQD's weight projections (Li et al. 2023, "Feature affinity assisted knowledge distillation and
quantization of deep neural networks"): binary and ternary weights, straight-through backward.

Binary (1 bit)::

    m = mean|w|                               (per tensor, or per output channel)
    w_b = m * sign(w)                         (sign(0) = +1)

Ternary (2 bits, 3 levels; the TWN rule)::

    Delta = 0.7 * mean|w|
    alpha = mean of |w| over {|w| > Delta}
    w_t = alpha * sign(w) * [|w| > Delta]

Backward: ``d w_q / d w = 1`` (the float weight takes the whole gradient, BinaryConnect style).
The projections recompute their scale from the current weight at every forward and keep the last
one in a buffer for :meth:`grid`. They are for weights only; quantize activations with another
method (e.g. ``act_method: lsq``).

Grids: binary codes ``{0, 1}``, ``scale = 2 m``, ``zero_point = 1/2`` (``2m (c - 1/2) = -m, +m``);
ternary codes ``{-1, 0, 1}``, ``scale = alpha``, ``zero_point = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import QuantGrid, Quantizer, Role, broadcast_channels, per_channel_reduce
from ..registry import register_quantizer

TWN_THRESHOLD = 0.7


class _WeightProjection(Quantizer):
    """Shared part: weights only, a fixed bit-width, a per-tensor or per-channel scale buffer."""

    required_bits = 1

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        if role != "weight":
            raise ValueError(
                f"{self.method!r} quantizes weights only; pick another method for activations, "
                f"e.g. act_method: lsq"
            )
        if bits != self.required_bits:
            raise ValueError(
                f"{self.method!r} weights use exactly {self.required_bits} bit(s), got {bits}; "
                f"set weight_bits: {self.required_bits} (or use 'lsq' for other bit-widths)"
            )
        #: the magnitude of the nonzero levels (m or alpha) from the last forward
        self.register_buffer("magnitude", torch.tensor(0.0))

    def _mean_abs(self, w: Tensor, kept: Tensor | None = None) -> Tensor:
        """Mean of ``|w|`` (over the ``kept`` elements when given), per tensor or per channel."""
        magnitude = w.detach().abs()
        kept = torch.ones_like(magnitude) if kept is None else kept.to(magnitude.dtype)
        if not self.per_channel:
            magnitude, kept = magnitude.reshape(1, -1), kept.reshape(1, -1)
        total = per_channel_reduce(magnitude * kept, self.channel_axis, "mean")
        mean = total / per_channel_reduce(kept, self.channel_axis, "mean").clamp_min(1e-12)
        return mean if self.per_channel else mean[0]

    def _project(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(codes, magnitude)`` of ``w``; subclasses implement."""
        raise NotImplementedError

    def _value(self, codes: Tensor, magnitude: Tensor) -> Tensor:
        raise NotImplementedError

    def quantize(self, x: Tensor) -> Tensor:
        codes, magnitude = self._project(x)
        self.magnitude = magnitude
        hard = self._value(codes, broadcast_channels(magnitude, x, self.channel_axis))
        return hard.detach() + (x - x.detach())

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        return self._project(x)[0]

    def _symmetric_grid(self, limit: int) -> QuantGrid:
        """Codes ``-limit..limit`` times the last magnitude, zero point 0."""
        scale = self.magnitude.clone()
        zero = torch.zeros_like(scale)
        axis = self.channel_axis if self.per_channel else None
        return QuantGrid(self.bits, -limit, limit, scale, zero, scale.clone(), zero.clone(), axis)


@register_quantizer("binary")
class BinaryQuantizer(_WeightProjection):
    """``mean|w| * sign(w)``: 1-bit weights with the per-layer (or per-channel) mean magnitude."""

    required_bits = 1

    def _project(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return (w.detach() >= 0).to(w.dtype), self._mean_abs(w)

    def _value(self, codes: Tensor, magnitude: Tensor) -> Tensor:
        return magnitude * (2 * codes - 1)

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        scale = 2 * self.magnitude
        half = torch.full_like(scale, 0.5)
        axis = self.channel_axis if self.per_channel else None
        return QuantGrid(1, 0, 1, scale, half, scale.clone(), half.clone(), axis)


@register_quantizer("ternary")
class TernaryQuantizer(_WeightProjection):
    """TWN ternary weights: ``alpha * sign(w)`` where ``|w| > 0.7 mean|w|``, else 0."""

    required_bits = 2

    def _project(self, w: Tensor) -> tuple[Tensor, Tensor]:
        threshold = TWN_THRESHOLD * self._mean_abs(w)
        kept = w.detach().abs() > broadcast_channels(threshold, w, self.channel_axis)
        codes = torch.sign(w.detach()) * kept
        return codes, self._mean_abs(w, kept)

    def _value(self, codes: Tensor, magnitude: Tensor) -> Tensor:
        return magnitude * codes

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        return self._symmetric_grid(1)


@register_quantizer("faqd4")
class LeastSquares4BitQuantizer(_WeightProjection):
    """FAQD's 4-bit weights: 15 symmetric levels ``s * {-7, ..., 7}`` with a least-squares scale.

    Per tensor (or per output channel)::

        d = min(max|w| / 15, 10)                       # the step of the integer magnitudes
        q = clamp(ceil(|w| / (2 d) - 1/2), 0, 7)       # q = j where (2j - 1) d < |w| <= (2j + 1) d
        s = sum(|w| q) / sum(q^2)                      # least-squares fit of |w| by s q, q fixed
        w_q = s * q * sign(w)

    as the released FAQD code computes it (one pass, not iterated; ties round down). Backward:
    straight through (``d w_q / d w = 1``). Grid: codes ``[-7, 7]``, scale ``s``, zero point 0
    (int4's -8 is never used). An all-zero weight projects to zero.
    """

    required_bits = 4
    max_step = 10.0

    def _reduce(self, values: Tensor, fn: str) -> Tensor:
        if self.per_channel:
            return per_channel_reduce(values, self.channel_axis, fn)
        return per_channel_reduce(values.reshape(1, -1), 0, fn)[0]

    def _project(self, w: Tensor) -> tuple[Tensor, Tensor]:
        magnitude = w.detach().abs()
        step = (self._reduce(magnitude, "amax") / 15).clamp(max=self.max_step)
        step = broadcast_channels(step, w, self.channel_axis).clamp_min(1e-30)
        integer = torch.ceil(magnitude / (2 * step) - 0.5).clamp(0, 7)
        fit = self._reduce(magnitude * integer, "sum") / self._reduce(
            integer * integer, "sum"
        ).clamp_min(1e-30)
        return torch.sign(w.detach()) * integer, fit

    def _value(self, codes: Tensor, magnitude: Tensor) -> Tensor:
        return magnitude * codes

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        return self._symmetric_grid(7)

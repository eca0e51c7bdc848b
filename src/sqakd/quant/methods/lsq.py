"""LSQ: learned step size quantization (Esser et al., 2020) and LSQ+ (Bhalgat et al., 2020).

LSQ, step size ``s`` learnable::

    v = round(clamp(x / s, -Qn, Qp)) * s
    signed (weights):       Qn = 2**(b-1), Qp = 2**(b-1) - 1
    unsigned (activations): Qn = 0,        Qp = 2**b - 1

Backward (the paper's Eq. 3): ``dv/dx = 1`` inside the range, 0 outside; ``dv/ds = -x/s +
round(x/s)`` inside, ``-Qn`` or ``Qp`` outside, with the step size's gradient multiplied by
``g = 1 / sqrt(N * Qp)`` (N = elements per channel for weights, features per example for
activations). Initialisation: ``s = 2 mean|x| / sqrt(Qp)``.

Signed 1-bit (Qp = 0 would leave one useful level): the levels are ``{-s, +s}`` (``sign(x) * s``),
written as ``v = 2s * (round(clamp(x / 2s + 1/2, 0, 1)) - 1/2)`` so that Eq. 3's rule still gives
``dv/ds = sign(x) - x/s`` inside ``|x| <= s``; ``Qp`` counts as 1 in ``g``, and ``s`` starts at
``mean|x|`` (the least-squares scale for ``sign(x) * s``).

LSQ+ adds a learnable offset ``beta`` to activations (asymmetric, codes ``0..2**b - 1``)::

    v = round(clamp((x - beta) / s, 0, 2**b - 1)) * s + beta

initialised from the first batch as ``s = (max - min) / (2**b - 1)``, ``beta = min``; both get the
gradient scale ``g``. LSQ+ weights are LSQ's, initialised as the paper does with
``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2**(b-1)``.

Grids: ``scale = s``, ``zero_point = 0`` (LSQ), ``-beta / s`` (LSQ+ activations, fractional) or
``1/2`` with ``scale = 2s`` (signed 1-bit).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..base import (
    QuantGrid,
    Quantizer,
    RangeKind,
    Role,
    broadcast_channels,
    per_channel_reduce,
    scale_gradient,
)
from ..kernels import lsq_fake_quantize
from ..registry import register_quantizer


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """Learned step size quantizer (symmetric for signed data, ``0..2**b - 1`` for unsigned)."""

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        self.step_size = nn.Parameter(torch.tensor(1.0))

    @property
    def binary(self) -> bool:
        return self.signed and self.bits == 1

    @property
    def code_range(self) -> tuple[int, int]:
        """Integer codes ``(qmin, qmax)``: ``(-Qn, Qp)``, or ``(0, 1)`` for signed 1-bit."""
        if self.binary:
            return 0, 1
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def positive_levels(self) -> int:
        """Qp of the paper (1 for signed 1-bit)."""
        return max(self.code_range[1], 1)

    def _reduce(self, x: Tensor, fn: str) -> Tensor:
        if self.per_channel:
            return per_channel_reduce(x, self.channel_axis, fn)
        return per_channel_reduce(x.reshape(1, -1), 0, fn)[0]

    def initialize(self, x: Tensor) -> None:
        mean_abs = self._reduce(x, "absmean")
        step = mean_abs if self.binary else 2 * mean_abs / math.sqrt(self.positive_levels)
        self.step_size.data = step.clamp_min(1e-8).clone()

    @property
    def range_kind(self) -> RangeKind:
        return "symmetric" if self.signed else "unsigned"

    def set_range(self, low: Tensor, high: Tensor) -> None:
        """``s = c / Qp`` for ``[-c, c]`` (``s = c`` at signed 1 bit: levels ``+-c``), ``s = c / (2**b
        - 1)`` for ``[0, c]``: the top level is ``c``."""
        self.step_size.data = (high / self.positive_levels).clamp_min(1e-8).clone()

    def gradient_scale(self, x: Tensor) -> float:
        """``g = 1 / sqrt(N * Qp)``: N elements per channel (weights) or per example (activations)."""
        per_range = x.numel() if self.role == "weight" and not self.per_channel else x[0].numel()
        return 1.0 / math.sqrt(per_range * self.positive_levels)

    def step_and_shift(self, grad_scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """``(step, shift)`` with ``v = code * step + shift``, gradients scaled by ``grad_scale``."""
        s = scale_gradient(self.step_size, grad_scale)
        if self.binary:
            return 2 * s, -s
        return s, torch.zeros_like(s)

    def quantize(self, x: Tensor) -> Tensor:
        step, shift = self.step_and_shift(self.gradient_scale(x))
        step = broadcast_channels(step, x, self.channel_axis)
        shift = broadcast_channels(shift, x, self.channel_axis)
        qmin, qmax = self.code_range
        zero_shift = not self.binary and getattr(self, "offset", None) is None
        shift_or_none = None if zero_shift else shift
        return lsq_fake_quantize(x, step, shift_or_none, qmin, qmax, self.compiled_kernels)

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        step, shift = (t.detach().clone() for t in self.step_and_shift())
        zero_point = -shift / step
        axis = self.channel_axis if self.per_channel else None
        return QuantGrid(self.bits, *self.code_range, step, zero_point, step, zero_point, axis)


@register_quantizer("lsq+")
class LSQPlusQuantizer(LSQQuantizer):
    """LSQ with a learnable offset for activations and the LSQ+ initialisation."""

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        if role == "activation":
            if self.signed:
                raise ValueError(
                    "lsq+ activations are asymmetric with a learned offset; drop signed=True"
                )
            self.offset = nn.Parameter(torch.tensor(0.0))

    def initialize(self, x: Tensor) -> None:
        if self.role == "activation":
            low, high = x.min(), x.max()
            self.step_size.data = ((high - low) / (2**self.bits - 1)).clamp_min(1e-8).clone()
            self.offset.data = low.clone()
        elif self.binary:
            super().initialize(x)
        else:
            mean, std = self._reduce(x, "mean"), self._reduce(x, "std")
            peak = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs())
            self.step_size.data = (peak / 2 ** (self.bits - 1)).clamp_min(1e-8).clone()

    @property
    def range_kind(self) -> RangeKind:
        return "asymmetric" if self.role == "activation" else super().range_kind

    def set_range(self, low: Tensor, high: Tensor) -> None:
        """Activations: ``s = (high - low) / (2**b - 1)``, ``beta = low``; weights as LSQ."""
        if self.role != "activation":
            return super().set_range(low, high)
        self.step_size.data = ((high - low) / (2**self.bits - 1)).clamp_min(1e-8).clone()
        self.offset.data = low.clone()

    def step_and_shift(self, grad_scale: float = 1.0) -> tuple[Tensor, Tensor]:
        if self.role == "weight":
            return super().step_and_shift(grad_scale)
        return scale_gradient(self.step_size, grad_scale), scale_gradient(self.offset, grad_scale)

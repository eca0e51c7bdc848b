"""DSQ: differentiable soft quantization (Gong et al., ICCV 2019).

A learnable clipping range ``[l, u]`` is cut into ``n = 2**b - 1`` intervals of width
``Delta = (u - l) / n``. In interval ``i`` (``P_i = [l + i Delta, l + (i + 1) Delta]``, midpoint
``m_i = l + (i + 1/2) Delta``) the soft quantizer is::

    phi(x)   = s * tanh(k (x - m_i)),   k = log(2 / alpha - 1) / Delta,   s = 1 / tanh(k Delta / 2)
    Q_S(x)   = l + Delta * (i + (phi(x) + 1) / 2)        (l below the range, u above it)

``alpha`` (learnable, initialised at 0.2) measures how far ``phi`` is from the sign function
(``1 - tanh(k Delta / 2) = alpha``); the paper needs ``0 < alpha < 1`` and we clamp it to
``[1e-4, 0.5]`` in the forward.

Forward value: the hard quantizer DSQ deploys, ``l + Delta * (i + (sign(phi) + 1) / 2)``, computed
as ``l + Delta * round((clip(x) - l) / Delta)`` (the same except exactly at a midpoint, where
``sign(phi) = 0`` would give a half level). Backward: the gradient of ``Q_S`` with respect to
``x``, ``l``, ``u`` and ``alpha``, what ``hard.detach() + Q_S - Q_S.detach()`` gives, computed
in one fused autograd function (:class:`sqakd.quant.kernels.DSQFakeQuantize`) instead of
through the staircase's dozen operations.

Initialisation from the first tensor: signed (weights) ``l = -3 std``, ``u = 3 std``, per output
channel with ``per_channel``; unsigned (activations) ``l = 0``, ``u = max(x)``; signed
activations ``l = min(x)``, ``u = max(x)``.

Grid: uniform, ``scale = Delta``, ``zero_point = -l / Delta`` (fractional in general), codes
``0..2**b - 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import (
    QuantGrid,
    Quantizer,
    RangeKind,
    Role,
    broadcast_channels,
    per_channel_reduce,
)
from ..kernels import DSQ_ALPHA_RANGE, DSQ_MIN_WIDTH, dsq_fake_quantize, dsq_step
from ..registry import register_quantizer


@register_quantizer("dsq")
class DSQQuantizer(Quantizer):
    """Differentiable soft quantizer: hard values forward, the tanh staircase's gradient backward.

    Args:
        init_alpha: starting value of the learnable ``alpha`` (the paper's 0.2), in (0, 1).
    """

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
        init_alpha: float = 0.2,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        if not 0.0 < init_alpha < 1.0:
            raise ValueError(f"dsq init_alpha must be in (0, 1), got {init_alpha}; try 0.2")
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    @property
    def num_steps(self) -> int:
        return self.levels_count - 1

    def initialize(self, x: Tensor) -> None:
        if self.signed and self.role == "weight":
            std = per_channel_reduce(x, self.channel_axis, "std") if self.per_channel else x.std()
            lower, upper = -3.0 * std, 3.0 * std
        else:
            lower = x.min() if self.signed else torch.zeros_like(x.max())
            upper = x.max()
        self.lower.data = lower.clone()
        self.upper.data = torch.maximum(upper, lower + DSQ_MIN_WIDTH).clone()

    @property
    def range_kind(self) -> RangeKind:
        if self.signed:
            return "symmetric" if self.role == "weight" else "asymmetric"
        return "unsigned"

    def set_range(self, low: Tensor, high: Tensor) -> None:
        """``l = low``, ``u = high`` (at least the minimum width apart)."""
        self.lower.data = low.clone()
        self.upper.data = torch.maximum(high, low + DSQ_MIN_WIDTH).clone()

    def _range(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(l, u, Delta)`` broadcast against ``x``."""
        lower = broadcast_channels(self.lower, x, self.channel_axis)
        upper = broadcast_channels(self.upper, x, self.channel_axis)
        return lower, upper, dsq_step(upper - lower, self.num_steps)

    def soft_quantize(self, x: Tensor) -> Tensor:
        """``Q_S(x)``, the differentiable staircase of the module docstring."""
        lower, upper, delta = self._range(x)
        return self._soft(torch.clamp(x, min=lower, max=upper), lower, delta)

    def _soft(self, clipped: Tensor, lower: Tensor, delta: Tensor) -> Tensor:
        with torch.no_grad():
            interval = torch.floor((clipped - lower) / delta).clamp_(0, self.num_steps - 1)
        midpoint = lower + (interval + 0.5) * delta
        alpha = self.alpha.clamp(*DSQ_ALPHA_RANGE)
        k = torch.log(2.0 / alpha - 1.0) / delta
        s = 1.0 / torch.tanh(0.5 * k * delta)
        phi = s * torch.tanh(k * (clipped - midpoint))
        return lower + delta * (interval + (phi + 1.0) / 2.0)

    def _codes(self, x: Tensor) -> Tensor:
        lower, upper, delta = self._range(x)
        clipped = torch.clamp(x, min=lower, max=upper)
        return torch.round((clipped - lower) / delta).clamp(0, self.num_steps)

    def quantize(self, x: Tensor) -> Tensor:
        return dsq_fake_quantize(
            x, self.lower, self.upper, self.alpha, self.num_steps, self.compiled_kernels
        )

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        return self._codes(x)

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        delta = dsq_step(self.upper - self.lower, self.num_steps)
        zero_point = -self.lower / delta
        axis = self.channel_axis if self.per_channel else None
        n = self.num_steps
        return QuantGrid(
            self.bits, 0, n, delta, zero_point, delta.clone(), zero_point.clone(), axis
        )

"""PACT: parameterized clipping activation (Choi et al., 2018).

Activations (n = 2**b - 1, alpha learnable)::

    y   = clip(x, 0, alpha)
    y_q = round(y * n / alpha) * alpha / n

Backward (the paper's Eq. 3, straight-through for the rounding): ``d y_q / d x = 1`` for
``0 <= x < alpha`` and 0 elsewhere; ``d y_q / d alpha = 1`` where ``x >= alpha`` and 0 elsewhere.
The paper's L2 penalty on alpha is the optimiser's weight decay, not part of the quantizer.

Weights: the paper quantizes weights with DoReFa's scheme, so ``role="weight"`` is exactly
:class:`~sqakd.quant.methods.dorefa.DoReFaQuantizer`'s weight quantizer.

Grid (activations): ``scale = alpha / n``, ``zero_point = 0``, codes ``0..n``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..base import QuantGrid, RangeKind, Role
from ..kernels import pact_fake_quantize
from ..registry import register_quantizer
from .dorefa import DoReFaQuantizer


@register_quantizer("pact")
class PACTQuantizer(DoReFaQuantizer):
    """PACT activations with a learnable clipping level; DoReFa weights.

    Args:
        init_alpha: the clipping level to start from (the paper's 10.0), or ``"max"`` to take the
            largest value of the first batch. Ignored for weights.
    """

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
        init_alpha: float | Literal["max"] = 10.0,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        number = isinstance(init_alpha, (int, float)) and not isinstance(init_alpha, bool)
        if init_alpha != "max" and not (number and init_alpha > 0):
            raise ValueError(f"init_alpha must be a positive number or 'max', got {init_alpha!r}")
        self.init_alpha = init_alpha
        if role == "activation":
            start = 1.0 if init_alpha == "max" else float(init_alpha)
            self.alpha = nn.Parameter(torch.tensor(start))

    def initialize(self, x: Tensor) -> None:
        if self.role == "activation" and self.init_alpha == "max":
            self.alpha.data.fill_(float(x.max().clamp_min(1e-8)))

    @property
    def range_kind(self) -> RangeKind | None:
        """Activations ``[0, alpha]``; the weights are DoReFa's, which take no range."""
        return "unsigned" if self.role == "activation" else None

    def set_range(self, low: Tensor, high: Tensor) -> None:
        if self.role != "activation":
            return super().set_range(low, high)
        self.alpha.data = high.clamp_min(1e-8).to(self.alpha).clone()

    def quantize(self, x: Tensor) -> Tensor:
        if self.role == "weight":
            return self.quantize_weight(x)
        # round(clamp(x, 0, alpha) * n / alpha) * alpha / n, STE around the rounding
        return pact_fake_quantize(x, self.alpha, self.num_steps)

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        if self.role == "weight":
            return super().grid()
        scale = self.alpha.detach() / self.num_steps
        zero = torch.zeros_like(scale)
        return QuantGrid(self.bits, 0, self.num_steps, scale, zero, scale, zero)

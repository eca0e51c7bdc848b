"""DoReFa-Net (Zhou et al., 2016): fixed (parameter-free) quantizers with the straight-through
estimator.

Weights, b >= 2 bits (n = 2**b - 1)::

    w_t = tanh(w) / (2 max|tanh(w)|) + 1/2                   # in [0, 1]
    out = 2 round(w_t * n) / n - 1                            # n + 1 levels in [-1, 1]

Weights, b = 1: ``out = sign(w) * mean|w|``, ``sign(0) = +1``; backward ``d out / d w = 1``.
Activations: ``out = round(clip(x, 0, 1) * n) / n``. ``round`` is the identity in the backward
(STE); the gradient flows through ``tanh`` and ``max`` as in the released code.

With ``per_channel=True`` the weight's max|tanh| (or mean|w| at 1 bit) is taken per output
channel. Grids: weights ``scale = 2/n``, ``zero_point = n/2`` (half-integer), codes ``0..n``;
1-bit weights ``scale = 2E``, ``zero_point = 1/2``, codes ``{0, 1}`` with ``E`` from the last
forward; activations ``scale = 1/n``, ``zero_point = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import QuantGrid, Quantizer, Role, broadcast_channels, per_channel_reduce, round_ste
from ..kernels import clamp_round_ste
from ..registry import register_quantizer


def dorefa_weight_codes(w: Tensor, bits: int, per_channel: bool = False) -> Tensor:
    """Codes ``0..n`` of the weight (the rounded ``w_t * n``, or ``w >= 0`` at one bit)."""
    if bits == 1:
        return (w >= 0).to(w.dtype)
    return torch.round(_normalised_weight(w, per_channel).detach() * (2**bits - 1))


def _normalised_weight(w: Tensor, per_channel: bool) -> Tensor:
    """``w_t = tanh(w) / (2 max|tanh(w)|) + 1/2``, differentiable."""
    t = torch.tanh(w)
    if per_channel:
        peak = t.abs().reshape(t.shape[0], -1).amax(dim=1)
        peak = broadcast_channels(peak, t, 0)
    else:
        peak = t.abs().max()
    return t / (2 * peak.clamp_min(1e-12)) + 0.5


def _mean_abs(w: Tensor, per_channel: bool) -> Tensor:
    """``E = mean|w|`` (per output channel if asked), not differentiated."""
    return per_channel_reduce(w, 0, "absmean") if per_channel else w.detach().abs().mean()


def dorefa_weight(w: Tensor, bits: int, per_channel: bool = False) -> Tensor:
    """DoReFa's weight quantizer (see the module docstring) with the STE for ``round``/``sign``."""
    if bits == 1:
        mean_abs = _mean_abs(w, per_channel)
        binary = torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * broadcast_channels(mean_abs, w, 0)
        return binary + (w - w.detach())  # exactly +-E forward, identity gradient
    n = 2**bits - 1
    return 2 * round_ste(_normalised_weight(w, per_channel) * n) / n - 1


@register_quantizer("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa-Net weights (tanh-normalised) and activations (clipped to [0, 1]); no parameters."""

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        if role == "activation" and self.signed:
            raise ValueError(
                f"{self.method} activations are clipped to [0, range]; drop signed=True "
                f"(use lsq+ for activations with negative values)"
            )
        if role == "weight" and bits == 1:  # E = mean|w| of the last weight seen: the grid scale
            self.register_buffer("binary_scale", torch.tensor(1.0))

    @property
    def num_steps(self) -> int:
        return self.levels_count - 1

    def quantize(self, x: Tensor) -> Tensor:
        if self.role == "weight":
            return self.quantize_weight(x)
        return clamp_round_ste(x, self.num_steps)  # round(clamp(x, 0, 1) n) / n, STE

    def quantize_weight(self, w: Tensor) -> Tensor:
        if self.bits == 1:
            self.binary_scale.data = _mean_abs(w, self.per_channel).to(self.binary_scale.dtype)
        return dorefa_weight(w, self.bits, self.per_channel)

    def codes(self, x: Tensor) -> Tensor:
        if self.role == "weight":
            return dorefa_weight_codes(x, self.bits, self.per_channel)
        return super().codes(x)

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        n = self.num_steps
        zero = torch.tensor(0.0)
        if self.role == "activation":
            scale = torch.tensor(1.0 / n)
            return QuantGrid(self.bits, 0, n, scale, zero, scale, zero)
        if self.bits == 1:
            scale = 2 * self.binary_scale.detach().clone()
            half = torch.full_like(scale, 0.5)
            axis = 0 if scale.dim() > 0 else None
            return QuantGrid(1, 0, 1, scale, half, scale, half, axis)
        # value = 2 q / n - 1 = (2 / n) (q - n / 2); the input pair maps w_t (not w) to codes
        return QuantGrid(
            self.bits, 0, n, torch.tensor(2.0 / n), torch.tensor(n / 2), torch.tensor(1.0 / n), zero
        )

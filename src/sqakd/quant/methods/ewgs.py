"""EWGS: element-wise gradient scaling (Lee, Kim & Ham, CVPR 2021), and its delta = 0 case, STE.

Forward (the learned-interval quantizer of the released SQAKD/EWGS CIFAR code)::

    x_n = clamp((x - lower) / (upper - lower), 0, 1)            # normalise to [0, 1]
    x_q = round(x_n * (2**b - 1)) / (2**b - 1)                   # 2**b levels
    weights:      out = |output_scale| * (2 * x_q - 1)           # [-1, 1], learnable scale
    activations:  out = x_q                                      # [0, 1]

Backward of the rounding: ``g_n = g_q * (1 + delta * sign(g_q) * (x_n - x_q))``. delta = 0 is the
straight-through estimator (registered as ``ste``: what the released SQAKD code runs by default).

Initialisation (released SQAKD CIFAR code): weights ``upper = 3 std``, ``lower = -3 std``;
activations ``upper = 3 std / sqrt(1 - 2/pi)``, ``lower = min``; the weight quantizer's output
scale is ``mean|float output| / mean|quantized output|`` of its layer on the first batch.

``output_scale`` multiplies the quantized weight rather than the layer output: the two are the
same for bias-free layers (every quantized layer in the papers' models); with a bias, ours leaves
the bias in float units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..base import QuantGrid, Quantizer, Role, broadcast_channels, per_channel_reduce
from ..registry import register_quantizer


class _EWGSRound(torch.autograd.Function):
    """round(x * n) / n, with the element-wise gradient scaling rule in the backward."""

    @staticmethod
    def forward(ctx, x_normalised: Tensor, num_steps: int, delta: Tensor) -> Tensor:  # type: ignore[override]
        x_rounded = torch.round(x_normalised * num_steps) / num_steps
        ctx.save_for_backward(x_normalised - x_rounded, delta)
        return x_rounded

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        error, delta = ctx.saved_tensors
        scaling = 1 + delta * torch.sign(grad_output) * error
        return grad_output * scaling, None, None


def ewgs_round(x_normalised: Tensor, num_steps: int, delta: Tensor | float) -> Tensor:
    """Round ``x_normalised`` (in [0, 1]) to ``num_steps + 1`` levels with EWGS's backward."""
    delta_tensor = torch.as_tensor(delta, dtype=x_normalised.dtype, device=x_normalised.device)
    return _EWGSRound.apply(x_normalised, num_steps, delta_tensor)


@register_quantizer("ewgs")
class EWGSQuantizer(Quantizer):
    """Learned-interval quantizer with element-wise gradient scaling.

    Args:
        delta: the gradient-scaling factor (the paper's default 1e-3); a buffer, so the
            Hessian-based update (:func:`update_ewgs_deltas`) can change it during training.
    """

    default_delta = 1e-3

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
        delta: float | None = None,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        self.register_buffer(
            "delta", torch.tensor(self.default_delta if delta is None else float(delta))
        )
        if role == "weight":
            self.output_scale = nn.Parameter(torch.tensor(1.0))
        #: set to True by update_ewgs_deltas to keep the rounded tensor for Hessian estimation
        self.keep_rounded = False
        self.last_rounded: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.levels_count - 1

    def initialize(self, x: Tensor) -> None:
        if self.role == "weight":
            std = per_channel_reduce(x, 0, "std") if self.per_channel else x.std()
            self.upper.data = (3.0 * std).clone()
            self.lower.data = (-3.0 * std).clone()
        else:
            self.upper.data = (x.std() / math.sqrt(1 - 2 / math.pi) * 3.0).clone()
            self.lower.data = x.min().clone()

    def normalise(self, x: Tensor) -> Tensor:
        lower = broadcast_channels(self.lower, x, self.channel_axis)
        upper = broadcast_channels(self.upper, x, self.channel_axis)
        return torch.clamp((x - lower) / (upper - lower), 0.0, 1.0)

    def quantize(self, x: Tensor) -> Tensor:
        rounded = ewgs_round(self.normalise(x), self.num_steps, self.delta)
        if self.keep_rounded:
            rounded.retain_grad()
            self.last_rounded = rounded
        if self.role == "activation":
            return rounded
        return self.output_scale.abs() * (2.0 * rounded - 1.0)

    @torch.no_grad()
    def match_output(self, float_output: Tensor, quantized_output: Tensor) -> None:
        if self.role == "weight":
            ratio = float_output.abs().mean() / quantized_output.abs().mean().clamp_min(1e-12)
            self.output_scale.data.fill_(float(ratio))

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        n = self.num_steps
        width = (self.upper - self.lower).detach()
        input_scale = width / n
        input_zero_point = -self.lower.detach() / input_scale
        if self.role == "activation":
            one = torch.ones_like(width)
            return QuantGrid(self.bits, 0, n, one / n, torch.zeros_like(width), input_scale,
                             input_zero_point, None)
        # value = |s| * (2 q / n - 1) = (2 |s| / n) * (q - n / 2)
        scale = 2.0 * self.output_scale.detach().abs() / n * torch.ones_like(width)
        zero_point = torch.full_like(width, n / 2)
        axis = 0 if self.per_channel else None
        return QuantGrid(self.bits, 0, n, scale, zero_point, input_scale, input_zero_point, axis)


@register_quantizer("ste")
class STEQuantizer(EWGSQuantizer):
    """EWGS's quantizer with delta = 0: the straight-through estimator with learned intervals."""

    default_delta = 0.0

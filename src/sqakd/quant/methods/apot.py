"""APoT: additive powers-of-two quantization (Li, Dong & Wang, ICLR 2020).

Levels. A level is a sum of power-of-two terms: with ``m`` magnitude bits, ``m // 2`` terms take
one of ``{0, 2**-e1, 2**-e2, 2**-e3}`` (k = 2 bits each) and, for odd ``m``, one more term takes
``{0, 2**-e}`` (k = 1). The exponents ``1, 2, 3, ...`` are dealt out round by round: round 1 gives
each two-bit term its first exponent, round 2 its second, then the one-bit term (odd ``m``) its
only one, then round 3 the third. The ``2**m`` sums (all distinct: the terms use disjoint
exponents) are divided by the largest, so the levels lie in ``[0, 1]``. This is the paper's
construction (``p_i`` in ``{0, 2**-i, 2**-(i+n), 2**-(i+2n)}``, up to that normalisation) and
reproduces the released code's level sets for ``m = 2..6``; ``m = 1`` gives ``{0, 1}``, ``m = 2``
pure powers of two ``{0, 1/4, 1/2, 1}``. For example ``m = 3``: terms ``{0, 2**-1, 2**-2, 2**-4}`` and ``{0, 2**-3}``.

* activations (unsigned): ``m = b``, ``2**b`` levels in ``[0, 1]``;
* weights (signed): ``m = b - 1`` magnitude bits mirrored around 0, ``2**b - 1`` levels; at
  ``b = 1`` the sign levels ``{-1, +1}``.

Forward: ``x_hat = alpha * P(clip(x / alpha))`` with ``P`` the nearest level (ties to the lower
magnitude) and clip to ``[-1, 1]`` (signed) or ``[0, 1]``. Weights are first normalised,
``w <- (w - mean(w)) / std(w)`` (per tensor, or per output channel with ``per_channel``; mean and
std without gradient, as in the released code); ``weight_norm=False`` skips this. The released
code then convolves with the normalised ``x_hat`` (the following batch norm absorbs ``1 / std``);
by default we map it back to the weight's units, ``mean + std * x_hat``, so that a layer prepared
from a trained float model keeps its output scale before any training (``keep_weight_scale=False``
gives the released behaviour; behind a batch norm the two train alike). Like batch-norm statistics,
mean and std are recomputed only while the weight trains (training mode, gradients recorded) and
stored in buffers; evaluation and export use the stored ones.

Backward, the reparameterised clipping function: ``d x_hat / d alpha = P(x / alpha) - x / alpha``
inside the clipping range and ``sign(x)`` outside; ``d x_hat / d x = 1`` (straight-through),
zeroed outside the range for activations only (the released code does not clip weight gradients).

Initial alpha (the released code's constants): 3 for normalised weights (3 std of the weight when
``weight_norm=False``), 8 for activations; ``init_alpha`` overrides both.

Grid: non-uniform, ``levels = shift + scale * alpha * unit_levels`` (``shift, scale = mean, std``
with ``keep_weight_scale``, else ``0, 1``; ``(C, L)`` per channel), codes ``0..len(levels) - 1``
index the sorted levels.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from ..base import QuantGrid, Quantizer, Role, broadcast_channels, per_channel_reduce
from ..registry import register_quantizer

ACTIVATION_ALPHA, WEIGHT_ALPHA_STDS = 8.0, 3.0


def apot_magnitudes(magnitude_bits: int) -> Tensor:
    """The ``2**magnitude_bits`` additive power-of-two levels in ``[0, 1]``, sorted ({1} for 0)."""
    if magnitude_bits == 0:
        return torch.ones(1)
    two_bit_terms, extra = divmod(magnitude_bits, 2)
    terms: list[list[float]] = [[0.0] for _ in range(two_bit_terms + extra)]
    exponent = 1
    for round_index in range(3):
        for term in terms[:two_bit_terms]:
            term.append(2.0**-exponent)
            exponent += 1
        if extra and round_index == 1:
            terms[-1].append(2.0**-exponent)
            exponent += 1
    sums = torch.tensor(sorted(sum(choice) for choice in itertools.product(*terms)))
    return sums / sums.max()


def apot_levels(bits: int, signed: bool) -> Tensor:
    """Sorted unit levels: ``2**bits`` in ``[0, 1]``, or ``2**bits - 1`` mirrored in ``[-1, 1]``."""
    if not signed:
        return apot_magnitudes(bits)
    magnitudes = apot_magnitudes(bits - 1)
    return torch.cat([-magnitudes[magnitudes > 0].flip(0), magnitudes])


def nearest_level(ratio: Tensor, magnitudes: Tensor, signed: bool) -> Tensor:
    """``P(clip(ratio))``: the nearest unit level (ties to the lower magnitude); for signed grids
    the magnitude ``|ratio|`` is projected and the sign put back (0 counts as positive)."""
    clipped = ratio.clamp(-1.0 if signed else 0.0, 1.0)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    projected = magnitudes[torch.bucketize(clipped.abs().contiguous(), midpoints)]
    return torch.where(clipped < 0, -projected, projected) if signed else projected


class _APoTProjection(torch.autograd.Function):
    """``alpha * P(clip(x / alpha))`` with the reparameterised clipping gradient."""

    @staticmethod
    def forward(ctx, x, alpha, magnitudes, signed, clip_input_grad):  # type: ignore[override]
        ratio = x / alpha
        inside = (ratio >= (-1.0 if signed else 0.0)) & (ratio <= 1.0)
        projected = nearest_level(ratio, magnitudes, signed)
        ctx.save_for_backward(ratio, projected, inside, alpha)
        ctx.clip_input_grad = clip_input_grad
        return projected * alpha

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        ratio, projected, inside, alpha = ctx.saved_tensors
        grad_x = grad_output * inside if ctx.clip_input_grad else grad_output
        # outside the range, projected is already sign(x) (or 0 below an unsigned range)
        grad_alpha = grad_output * torch.where(inside, projected - ratio, projected)
        return grad_x, grad_alpha.sum_to_size(alpha.shape), None, None, None


@register_quantizer("apot")
class APoTQuantizer(Quantizer):
    """Additive powers-of-two levels with a learnable clipping threshold ``alpha``.

    Args:
        init_alpha: starting clipping threshold (default: see the module docstring).
        weight_norm: normalise weights to zero mean, unit std before quantizing (the paper).
        keep_weight_scale: map normalised quantized weights back to the weight's units,
            ``mean + std * x_hat`` (default); ``False`` leaves them normalised, as the released
            code does (the following batch norm then absorbs the scale).
    """

    uniform = False

    def __init__(
        self,
        bits: int,
        role: Role = "weight",
        per_channel: bool = False,
        signed: bool | None = None,
        init_alpha: float | None = None,
        weight_norm: bool = True,
        keep_weight_scale: bool = True,
    ) -> None:
        super().__init__(bits, role, per_channel, signed)
        if init_alpha is not None and not init_alpha > 0:
            raise ValueError(f"apot init_alpha must be positive, got {init_alpha}")
        self.init_alpha = init_alpha
        self.weight_norm = weight_norm and role == "weight"
        self.keep_weight_scale = keep_weight_scale
        self.alpha = nn.Parameter(torch.tensor(1.0))
        magnitudes = apot_magnitudes(bits - 1 if self.signed else bits)
        self.register_buffer("magnitudes", magnitudes, persistent=False)
        self.register_buffer("unit_levels", apot_levels(bits, self.signed), persistent=False)
        # the weight statistics of the normalisation (refreshed while the weight trains)
        self.register_buffer("weight_mean", torch.tensor(0.0))
        self.register_buffer("weight_std", torch.tensor(1.0))

    def _reduce(self, x: Tensor, fn: str) -> Tensor:
        if self.per_channel:
            return per_channel_reduce(x, self.channel_axis, fn)
        return per_channel_reduce(x.reshape(1, -1), 0, fn)[0]

    def normalise(self, x: Tensor) -> Tensor:
        """``(w - mean) / std`` for weights (constants: no gradient through them), else ``x``.

        The statistics are recomputed while the weight is being trained (training mode with
        gradients recorded) and at initialisation; otherwise the stored ones are used, so that
        evaluation, export and packing see a function of the codes and the stored state."""
        if not self.weight_norm:
            return x
        if not self.is_initialized or (self.training and torch.is_grad_enabled()):
            self.weight_mean = self._reduce(x, "mean")
            self.weight_std = self._reduce(x, "std").clamp_min(1e-12)
        mean = broadcast_channels(self.weight_mean, x, self.channel_axis)
        return (x - mean) / broadcast_channels(self.weight_std, x, self.channel_axis)

    def output_map(self) -> tuple[Tensor, Tensor]:
        """``(shift, scale)`` taking normalised values back to weight units (``(0, 1)`` when the
        output stays normalised)."""
        if self.weight_norm and self.keep_weight_scale:
            return self.weight_mean, self.weight_std
        return torch.zeros_like(self.alpha.detach()), torch.ones_like(self.alpha.detach())

    def initialize(self, x: Tensor) -> None:
        if self.init_alpha is not None:
            alpha = torch.full_like(self._reduce(x, "mean"), self.init_alpha)
        elif self.role == "weight":
            alpha = WEIGHT_ALPHA_STDS * self._reduce(self.normalise(x), "std")
        else:
            alpha = torch.tensor(ACTIVATION_ALPHA)
        self.alpha.data = alpha.clamp_min(1e-8).to(x).clone()

    def _to_output(self, normalised: Tensor, like: Tensor) -> Tensor:
        shift, scale = (broadcast_channels(t, like, self.channel_axis) for t in self.output_map())
        return shift + scale * normalised

    def quantize(self, x: Tensor) -> Tensor:
        normalised = self.normalise(x)
        alpha = broadcast_channels(self.alpha, x, self.channel_axis)
        clip_input_grad = self.role == "activation"
        magnitudes = self.magnitudes.to(x.dtype)
        projected = _APoTProjection.apply(
            normalised, alpha, magnitudes, self.signed, clip_input_grad
        )
        return self._to_output(projected, x)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Index of each element's level in :meth:`grid`'s sorted ``levels``."""
        ratio = self.normalise(x) / broadcast_channels(self.alpha, x, self.channel_axis)
        unit = nearest_level(ratio, self.magnitudes.to(x.dtype), self.signed)
        return torch.searchsorted(self.unit_levels.to(x.dtype), unit.contiguous()).to(x.dtype)

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        """``levels = shift + scale * alpha * unit_levels`` (``(C, L)`` per channel)."""
        alpha = self.alpha.detach().clone()
        shift, scale = self.output_map()
        if self.per_channel:
            levels = shift.unsqueeze(-1) + scale.unsqueeze(-1) * (
                self.unit_levels * alpha.unsqueeze(-1)
            )
        else:
            levels = shift + scale * (self.unit_levels * alpha)
        step = alpha * scale
        zero = torch.zeros_like(alpha)
        axis = self.channel_axis if self.per_channel else None
        qmax = self.unit_levels.numel() - 1
        return QuantGrid(self.bits, 0, qmax, step, zero, step.clone(), zero.clone(), axis, levels)

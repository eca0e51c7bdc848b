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

import logging
import math
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

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
from ..kernels import ewgs_fake_quantize
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
            self.output_scale.data.fill_(1.0)  # match_output sets it next, from this start
        else:
            self.upper.data = (x.std() / math.sqrt(1 - 2 / math.pi) * 3.0).clone()
            self.lower.data = x.min().clone()

    @property
    def range_kind(self) -> RangeKind:
        return "symmetric" if self.role == "weight" else "asymmetric"

    def set_range(self, low: Tensor, high: Tensor) -> None:
        """``lower = low``, ``upper = high`` (at least 1e-8 apart); a weight's output scale is
        then set by :meth:`match_output` as usual."""
        self.lower.data = low.clone()
        self.upper.data = torch.maximum(high, low + 1e-8).clone()

    def normalise(self, x: Tensor) -> Tensor:
        lower = broadcast_channels(self.lower, x, self.channel_axis)
        upper = broadcast_channels(self.upper, x, self.channel_axis)
        return torch.clamp((x - lower) / (upper - lower), 0.0, 1.0)

    def quantize(self, x: Tensor) -> Tensor:
        if self.keep_rounded:  # the Hessian update needs the rounded tensor in the graph
            rounded = ewgs_round(self.normalise(x), self.num_steps, self.delta)
            if rounded.requires_grad:
                self.last_rounded = rounded
        else:
            rounded = ewgs_fake_quantize(
                x, self.lower, self.upper, self.num_steps, self.delta, self.compiled_kernels
            )
        if self.role == "activation":
            return rounded
        return self.output_scale.abs() * (2.0 * rounded - 1.0)

    @torch.no_grad()
    def match_output(self, float_output: Tensor, quantized_output: Tensor) -> None:
        if self.role == "weight":  # quantized_output was computed with output_scale 1
            ratio = float_output.abs().mean() / quantized_output.abs().mean().clamp_min(1e-12)
            self.output_scale.data.fill_(float(ratio))

    @torch.no_grad()
    def grid(self) -> QuantGrid:
        n = self.num_steps
        width = (self.upper - self.lower).detach()
        input_scale = width / n
        input_zero_point = -self.lower.detach() / input_scale
        if self.role == "activation":
            one, zero = torch.ones_like(width), torch.zeros_like(width)
            return QuantGrid(self.bits, 0, n, one / n, zero, input_scale, input_zero_point)
        # value = |s| * (2 q / n - 1) = (2 |s| / n) * (q - n / 2)
        scale = 2.0 * self.output_scale.detach().abs() / n * torch.ones_like(width)
        zero_point = torch.full_like(width, n / 2)
        axis = 0 if self.per_channel else None
        return QuantGrid(self.bits, 0, n, scale, zero_point, input_scale, input_zero_point, axis)


@register_quantizer("ste")
class STEQuantizer(EWGSQuantizer):
    """EWGS's quantizer with delta = 0: the straight-through estimator with learned intervals."""

    default_delta = 0.0


def hutchinson_trace(grad: Tensor, point: Tensor, probes: int = 50, tol: float = 1e-3) -> float:
    """Hutchinson's estimate of Tr(H), H = d grad / d point (``grad`` built with create_graph):
    the mean of ``v . (H v)`` over up to ``probes`` Rademacher vectors v (entries +-1). As in the
    released code, it stops early once a probe moves the running mean by less than ``tol``
    (relative); ``tol=0`` always runs every probe."""
    if not grad.requires_grad:  # the loss is linear in ``point``: H = 0
        return 0.0
    estimates: list[float] = []
    for _ in range(probes):
        probe = torch.randint_like(point, 2) * 2 - 1
        (product,) = torch.autograd.grad(grad, point, probe, retain_graph=True, allow_unused=True)
        previous = sum(estimates) / len(estimates) if estimates else None
        estimates.append(0.0 if product is None else float((product * probe).sum()))
        current = sum(estimates) / len(estimates)
        if previous is not None and abs(current - previous) < tol * (abs(previous) + 1e-6):
            break
    return sum(estimates) / len(estimates)


def update_ewgs_deltas(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable[Any],
    num_batches: int = 3,
    probes: int = 50,
    tol: float = 1e-3,
) -> dict[str, float]:
    """Set every EWGS quantizer's delta from the loss curvature (EWGS paper, Sec. 3.3).

    For each of the first ``num_batches`` batches: the gradient g of ``loss_fn(model, batch)``
    w.r.t. each quantizer's rounded tensor, with ``create_graph=True`` (parameters' ``.grad`` are
    not touched), then ``(Tr(H) / numel) / (3 std(g))`` (``std`` unbiased). delta becomes the mean over batches, clipped at 0 as in
    the released code. The model's train/eval mode is left as the caller set it (the released
    code runs in train mode). Returns ``{quantizer name: new delta}``; STE quantizers are skipped.
    """
    targets = [
        (name, q)
        for name, q in model.named_modules()
        if isinstance(q, EWGSQuantizer) and not isinstance(q, STEQuantizer)
    ]
    if not targets:
        raise ValueError("the model has no EWGS quantizer; prepare it with method 'ewgs' first")
    totals = {name: 0.0 for name, _ in targets}
    counts = {name: 0 for name, _ in targets}
    for _, quantizer in targets:
        quantizer.keep_rounded, quantizer.last_rounded = True, None
    try:
        for index, batch in enumerate(batches):
            if index >= num_batches:
                break
            loss = loss_fn(model, batch)
            reached = [(name, q.last_rounded) for name, q in targets if q.last_rounded is not None]
            if not reached:
                continue
            # autograd.grad rather than backward(): the parameters' .grad stay untouched
            grads = torch.autograd.grad(
                loss, [r for _, r in reached], create_graph=True, allow_unused=True
            )
            for (name, rounded), grad in zip(reached, grads):
                if grad is None or rounded.numel() < 2:
                    continue
                spread = 3.0 * float(grad.detach().std())
                trace = hutchinson_trace(grad, rounded, probes, tol)
                totals[name] += trace / rounded.numel() / spread if spread > 0 else 0.0
                counts[name] += 1
            for _, quantizer in targets:
                quantizer.last_rounded = None
    finally:
        for _, quantizer in targets:
            quantizer.keep_rounded, quantizer.last_rounded = False, None
    if not any(counts.values()):
        raise ValueError("update_ewgs_deltas got no batch that reaches an EWGS quantizer")
    deltas = {name: max(totals[name] / counts[name], 0.0) for name in totals if counts[name]}
    for name, quantizer in targets:
        if name in deltas:
            quantizer.delta.fill_(deltas[name])
    return deltas


class EWGSDeltaSchedule:
    """EWGS's delta update as an epoch hook (``train.ewgs_delta_every_epochs``): at the start of
    every ``every``-th epoch (0, every, 2 every, ...), :func:`update_ewgs_deltas` on the epoch's
    first ``batches`` batches with the method's own loss. The trainer calls it with
    ``(epoch, model, loss, batches)`` and rewinds its loader afterwards. Under DDP the deltas are
    buffers, broadcast from rank 0 like every other buffer."""

    def __init__(self, every: int, batches: int = 3) -> None:
        if every < 1 or batches < 1:
            raise ValueError("the EWGS delta update needs every >= 1 and batches >= 1")
        self.every, self.batches = every, batches

    def __call__(
        self,
        epoch: int,
        model: nn.Module,
        loss: Callable[[nn.Module, Any], Tensor],
        batches: Iterable[Any],
    ) -> dict[str, float]:
        if epoch % self.every:
            return {}
        deltas = update_ewgs_deltas(
            model, loss, islice(batches, self.batches), num_batches=self.batches
        )
        if deltas:
            values = sorted(deltas.values())
            logging.getLogger("sqakd").info(
                "EWGS delta update (epoch %d): %d quantizers, delta %.3g .. %.3g (median %.3g)",
                epoch + 1, len(values), values[0], values[-1], values[len(values) // 2],
            )  # fmt: skip
        return deltas

"""Fused fake-quantization kernels: each quantizer's whole forward and backward in a few passes
over the tensor, instead of one pass (and one temporary) per operation of its definition.

Two ways to run them, chosen per call (``compiled=``), i.e. per quantizer: a prepared model's
quantizers all follow ``prepare(..., compiled_kernels=...)`` or
:func:`sqakd.quant.set_compiled_kernels`, so two models in one process may run differently:

- eager (default): hand-fused PyTorch ops, about a third of the memory traffic of the
  op-by-op definition;
- compiled (``run.compile: true``): the same formulas through ``torch.compile`` (one loop for the
  forward, one for the backward with its sums). It needs a C++ compiler; the first use compiles
  for some seconds (cached on disk afterwards). If compiling one kernel (``"ewgs"``, ``"lsq"``,
  ``"dsq"``) fails, that kernel runs eagerly from then on, with one warning; the others stay
  compiled.

Each autograd function states the gradient it computes; the tests compare both ways with the
op-by-op definitions.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: caches, not modes: the compiled function of each kernel part ("ewgs_forward", ...), and the
#: kernels ("ewgs", ...) that torch.compile could not build in this process (warned once each)
_compiled: dict[str, Callable[..., Any]] = {}
_failed: set[str] = set()


def failed_kernels() -> frozenset[str]:
    """The kernels (``"ewgs"``, ``"lsq"``, ``"dsq"``) that ``torch.compile`` could not build in
    this process; they run eagerly even where compiled kernels are asked for."""
    return frozenset(_failed)


def clear_kernel_cache() -> None:
    """Forget the compiled kernels and the compile failures: the next compiled call builds its
    kernel again (``torch.compile``'s own on-disk cache is kept)."""
    _compiled.clear()
    _failed.clear()


def cpp_compiler_found() -> bool:
    """Whether a C++ compiler is on the PATH (``$CXX``, ``g++``, ``clang++`` or ``c++``): what
    ``torch.compile`` needs to build CPU kernels."""
    names = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    return any(shutil.which(name) for name in names if name)


def should_compile_kernels(setting: bool | str, device: torch.device) -> bool:
    """``run.compile`` resolved for ``device``: ``True``/``False`` as given; ``"auto"`` compiles
    on the CPU when a C++ compiler is found (a one-off 8-16 s build, cached on disk, for 10-20 %
    faster quantized training steps) and stays eager on other devices, where the compiled kernels
    are untested here."""
    if setting == "auto":
        return device.type == "cpu" and cpp_compiler_found()
    return bool(setting)


def _compiles(kernel: str, compiled: bool) -> bool:
    """Whether a call of ``kernel`` asked to run ``compiled`` takes the compiled path: not when
    compiling that kernel has failed here (then its hand-fused eager path is faster)."""
    return compiled and kernel not in _failed


def _run(kernel: str, part: str, eager: Callable[..., Any], *args: Any) -> Any:
    """``eager(*args)`` through ``torch.compile``, the compiled function cached by name
    (``"ewgs_forward"``). If ``torch.compile`` cannot build it here, ``kernel`` is marked failed
    (one warning) and ``eager`` runs, now and for its later calls."""
    if kernel in _failed or torch.is_grad_enabled():
        return eager(*args)
    # plain tensors only: a Parameter (a weight) and a Tensor (an activation) would otherwise
    # each need their own compiled graph and exhaust torch._dynamo's recompile limit
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    name = f"{kernel}_{part}"
    try:
        function = _compiled.get(name)
        if function is None:
            function = _compiled[name] = torch.compile(eager, dynamic=True)
        return function(*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure means: this kernel eager
        _failed.add(kernel)
        logging.getLogger("sqakd").warning(
            "torch.compile could not build the %s kernel (%s: %s); it runs eagerly",
            name,
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
        )
        return eager(*args)


def _channel_view(value: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector (C,) as (C, 1, ..., 1) against ``like``; 0-d stays 0-d."""
    return value if value.dim() == 0 else value.reshape((-1,) + (1,) * (like.dim() - 1))


def _inside_mask(clamped: Tensor, x: Tensor) -> Tensor:
    """1.0 where ``clamped == x`` (inside the clip range, bounds included), 0.0 outside, in
    ``x``'s dtype. Multiplying a gradient by a float mask is several times faster on the CPU than
    ``masked_fill`` or ``torch.where`` with a boolean one (a 128x16x32x32 tensor on our machine:
    mask 0.4 and multiply 0.5 ms, against 1.2 and 3.4 ms), at four bytes per element saved
    instead of one. Unlike ``masked_fill``, a NaN or infinite gradient outside the range stays
    NaN (0 * inf), which only a diverged step produces."""
    return torch.eq(clamped, x, out=torch.empty_like(x))


def _sum_to(values: Tensor, like: Tensor) -> Tensor:
    """Sum ``values`` to the shape of ``like``: everything (0-d) or all but dim 0 (per channel)."""
    if like.dim() == 0:
        return values.sum()
    return values.sum(dim=tuple(range(1, values.dim())), keepdim=True)


def _flat(tensor: Tensor) -> Tensor:
    """A 1-d view in memory order (contiguous or channels-last), else a copy."""
    if tensor.dim() == 4 and not tensor.is_contiguous():
        if tensor.is_contiguous(memory_format=torch.channels_last):
            return tensor.permute(0, 2, 3, 1).reshape(-1)
    return tensor.reshape(-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum()`` without the temporary when both share a layout."""
    if a.stride() == b.stride():
        return torch.dot(_flat(a), _flat(b))
    return (a * b).sum()


# ------------------------------------------------------------------------------------- EWGS
def _ewgs_forward(x: Tensor, scale: Tensor, bias: Tensor, num_steps: int) -> Tensor:
    return torch.round(torch.clamp(x * scale + bias, 0.0, num_steps)) / num_steps


def _ewgs_backward(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    bias: Tensor,
    width: Tensor,
    delta: Tensor,
    num_steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    scaled = x * scale + bias
    clamped = torch.clamp(scaled, 0.0, num_steps)
    error = clamped - torch.round(clamped)  # n (t - q)
    g = torch.where(clamped == scaled, grad + (delta / num_steps) * grad.abs() * error, 0.0)
    total = _sum_to(g, width)
    weighted = _sum_to(g * clamped, width) / num_steps
    return g / width, (weighted - total) / width, -weighted / width


class EWGSFakeQuantize(torch.autograd.Function):
    """EWGS's forward ``q = round(clamp((x - l) / (u - l), 0, 1) * n) / n`` and backward.

    With ``w = u - l``, ``t = clamp((x - l) / w, 0, 1)`` and, on elements inside ``[l, u]``
    (bounds included, as ``torch.clamp``), ``G = g (1 + delta sign(g) (t - q))`` (0 outside):
    ``dx = G / w``, ``du = -sum(G t) / w``, ``dl = sum(G (t - 1)) / w``, the sums per channel
    when ``l``/``u`` are per-channel vectors (channel axis 0). delta = 0 is the STE.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, lower: Tensor, upper: Tensor, num_steps: int, delta: Tensor, compiled: bool
    ) -> Tensor:
        low = _channel_view(lower, x)
        width = _channel_view(upper, x) - low
        scale = num_steps / width
        bias = -low * scale
        ctx.num_steps, ctx.range_shape = num_steps, lower.shape
        if _compiles("ewgs", compiled):
            ctx.compiled = True
            ctx.save_for_backward(x, scale, bias, width, delta)
            return _run("ewgs", "forward", _ewgs_forward, x, scale, bias, num_steps)
        ctx.compiled = False
        scaled = torch.addcmul(bias, x, scale)  # t * n before clamping
        clamped = scaled.clamp(0.0, num_steps)
        inside = _inside_mask(clamped, scaled)
        del scaled
        out = torch.round(clamped).div_(num_steps)
        # delta == 0 (STE) skips the scaling; read on CPU only (no device sync on GPUs)
        ctx.plain_ste = delta.device.type == "cpu" and float(delta) == 0.0
        ctx.save_for_backward(clamped, out, inside, width, delta)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None, None]:  # type: ignore[override]
        n = ctx.num_steps
        if ctx.compiled:
            x, scale, bias, width, delta = ctx.saved_tensors
            grad_x, grad_lower, grad_upper = _run(
                "ewgs", "backward", _ewgs_backward, grad, x, scale, bias, width, delta, n
            )
            return (
                grad_x,
                grad_lower.reshape(ctx.range_shape),
                grad_upper.reshape(ctx.range_shape),
                None,
                None,
                None,
            )
        clamped, out, inside, width, delta = ctx.saved_tensors
        if ctx.plain_ste:
            g = grad * inside
        else:
            error = torch.sub(clamped, out, alpha=n).mul_(grad.abs())  # n (t - q) |g|
            g = torch.addcmul(grad, error, delta / n).mul_(inside)
        total = _sum_to(g, width)
        weighted = (_dot(g, clamped) if width.dim() == 0 else _sum_to(g * clamped, width)) / n
        grad_lower = ((weighted - total) / width).reshape(ctx.range_shape)
        grad_upper = (-weighted / width).reshape(ctx.range_shape)
        return g.div_(width), grad_lower, grad_upper, None, None, None


def ewgs_fake_quantize(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    num_steps: int,
    delta: Tensor,
    compiled: bool = False,
) -> Tensor:
    """``round(clamp((x - lower) / (upper - lower), 0, 1) * num_steps) / num_steps`` with the
    EWGS backward (:class:`EWGSFakeQuantize`); ``lower``/``upper`` 0-d or per channel (axis 0);
    ``compiled``: through ``torch.compile``."""
    return EWGSFakeQuantize.apply(x, lower, upper, num_steps, delta.to(x.dtype), compiled)


# -------------------------------------------------------------------------------------- LSQ
def _lsq_forward(x: Tensor, step: Tensor, shift: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.round(torch.clamp((x - shift) / step, qmin, qmax)) * step + shift


def _lsq_backward(
    grad: Tensor, x: Tensor, step: Tensor, shift: Tensor, qmin: int, qmax: int
) -> tuple[Tensor, Tensor, Tensor]:
    normalised = (x - shift) / step
    clamped = torch.clamp(normalised, qmin, qmax)
    grad_x = torch.where(clamped == normalised, grad, 0.0)
    grad_step = _sum_to(grad * torch.round(clamped) - grad_x * clamped, step)
    grad_shift = _sum_to(grad - grad_x, step)
    return grad_x, grad_step, grad_shift


class LSQFakeQuantize(torch.autograd.Function):
    """``round(clamp((x - shift) / step, qmin, qmax)) * step + shift`` with the LSQ gradients
    (Esser et al., Eq. 3). With ``t = (x - shift) / step``, ``c = clamp(t)`` and inside =
    ``qmin <= t <= qmax``: ``dx = g`` inside, 0 outside; ``dstep = sum(g (round(c) - t inside))``
    (``round(t) - t`` inside, ``qmin``/``qmax`` outside); ``dshift = sum of g outside``. ``step``
    and ``shift`` are 0-d or shaped to broadcast per channel; ``shift`` may be ``None`` (0)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        step: Tensor,
        shift: Tensor | None,
        qmin: int,
        qmax: int,
        compiled: bool,
    ) -> Tensor:
        ctx.has_shift, ctx.codes = shift is not None, (qmin, qmax)
        if _compiles("lsq", compiled):
            ctx.compiled = True
            shift_or_zero = torch.zeros_like(step) if shift is None else shift
            ctx.save_for_backward(x, step, shift_or_zero)
            return _run("lsq", "forward", _lsq_forward, x, step, shift_or_zero, qmin, qmax)
        ctx.compiled = False
        normalised = (x if shift is None else x - shift).div(step)
        clamped = normalised.clamp(qmin, qmax)
        inside = _inside_mask(clamped, normalised)
        del normalised
        out = torch.round(clamped).mul_(step)
        if shift is not None:
            out.add_(shift)
        ctx.save_for_backward(clamped, inside, step)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None, None, None]:  # type: ignore[override]
        if ctx.compiled:
            x, step, shift = ctx.saved_tensors
            grad_x, grad_step, grad_shift = _run(
                "lsq", "backward", _lsq_backward, grad, x, step, shift, *ctx.codes
            )
            return grad_x, grad_step, grad_shift if ctx.has_shift else None, None, None, None
        clamped, inside, step = ctx.saved_tensors
        grad_x = grad * inside
        # round(c) on every element minus c on the inside ones (where c = t)
        if step.dim() == 0:  # two dot products, no full-size temporaries but round(c)
            grad_step = _dot(torch.round(clamped), grad) - _dot(grad_x, clamped)
        else:
            grad_step = _sum_to(torch.round(clamped).mul_(grad) - grad_x * clamped, step)
        grad_shift = None
        if ctx.has_shift:
            grad_shift = (
                grad.sum() - grad_x.sum() if step.dim() == 0 else _sum_to(grad - grad_x, step)
            )
        return grad_x, grad_step, grad_shift, None, None, None


def lsq_fake_quantize(
    x: Tensor,
    step: Tensor,
    shift: Tensor | None,
    qmin: int,
    qmax: int,
    compiled: bool = False,
) -> Tensor:
    """``round(clamp((x - shift) / step, qmin, qmax)) * step + shift`` with LSQ's gradients
    (:class:`LSQFakeQuantize`); ``compiled``: through ``torch.compile``."""
    return LSQFakeQuantize.apply(x, step, shift, qmin, qmax, compiled)


# ------------------------------------------------------------------------------------- PACT
class PACTFakeQuantize(torch.autograd.Function):
    """PACT's activation ``q = round(clamp(x, 0, alpha) * n / alpha) * alpha / n`` (Choi et al.,
    Eq. 1-2) with its straight-through backward: ``dx = g`` for ``0 <= x < alpha`` (0 elsewhere)
    and ``dalpha = sum(g over x >= alpha)`` (the rounding is passed straight through, so the
    inside elements add nothing to alpha's gradient). Four passes forward (clamp, scale, round,
    rescale; ``n / alpha`` and ``alpha / n`` computed once, so a value may differ from the
    op-by-op ``* n / alpha`` in the last bit), the input saved for the backward (its producer,
    a ReLU, keeps it alive anyway)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, num_steps: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, alpha)
        clipped = torch.clamp(x, min=torch.zeros_like(alpha), max=alpha)
        return clipped.mul_(num_steps / alpha).round_().mul_(alpha / num_steps)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        above = torch.ge(x, alpha, out=torch.empty_like(x))  # float masks: see _inside_mask
        grad_alpha = _sum_to_dot(grad, above, alpha)
        inside = torch.ge(x, 0.0, out=torch.empty_like(x)).sub_(above)  # 0 <= x < alpha
        return inside.mul_(grad), grad_alpha, None


def pact_fake_quantize(x: Tensor, alpha: Tensor, num_steps: int) -> Tensor:
    """PACT's clipped, rounded activation with its gradients (:class:`PACTFakeQuantize`)."""
    return PACTFakeQuantize.apply(x, alpha, num_steps)


# ---------------------------------------------------------------------------------- DoReFa
class ClampRoundSTE(torch.autograd.Function):
    """``round(clamp(x, 0, 1) * n) / n`` (DoReFa's activation) with the straight-through
    backward of the rounding: ``dx = g`` for ``0 <= x <= 1`` (``torch.clamp``'s own rule),
    0 elsewhere. One mask saved (float: see _inside_mask)."""

    @staticmethod
    def forward(ctx, x: Tensor, num_steps: int) -> Tensor:  # type: ignore[override]
        clamped = x.clamp(0.0, 1.0)
        ctx.save_for_backward(_inside_mask(clamped, x))
        return clamped.mul_(num_steps).round_().div_(num_steps)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def clamp_round_ste(x: Tensor, num_steps: int) -> Tensor:
    """``round(clamp(x, 0, 1) * num_steps) / num_steps`` with a straight-through rounding."""
    return ClampRoundSTE.apply(x, num_steps)


# -------------------------------------------------------------------------------------- DSQ
DSQ_MIN_WIDTH = 1e-8  # u - l is clamped to at least this
DSQ_ALPHA_RANGE = (1e-4, 0.5)  # alpha is clamped into this range (the paper needs 0 < alpha < 1)


def dsq_step(width: Tensor, num_steps: int) -> Tensor:
    """``Delta = max(u - l, min width) / n`` from ``width = u - l``."""
    return width.clamp_min(DSQ_MIN_WIDTH) / num_steps


def dsq_kappa(alpha: Tensor) -> Tensor:
    """``kappa = k Delta = log(2 / alpha - 1)`` with ``alpha`` clamped to
    :data:`DSQ_ALPHA_RANGE`."""
    return torch.log(2.0 / alpha.clamp(*DSQ_ALPHA_RANGE) - 1.0)


class _FloatMath:
    """The functions DSQ's gradient epilogue needs, on Python floats (see :func:`_numbers`)."""

    exp = staticmethod(math.exp)
    tanh = staticmethod(math.tanh)

    @staticmethod
    def frac(value: float) -> float:
        return math.fmod(value, 1.0)  # the sign of value, like torch.frac

    @staticmethod
    def total(value: float) -> float:
        return value

    @staticmethod
    def reciprocal_or_zero(value: float) -> float:
        return 1.0 / value if value > 0 else 0.0


class _TensorMath:
    """The same functions on tensors (per-channel ranges, or tensors off the CPU)."""

    exp, tanh, frac, total = torch.exp, torch.tanh, torch.frac, torch.sum

    @staticmethod
    def reciprocal_or_zero(value: Tensor) -> Tensor:
        return torch.where(value > 0, 1.0 / value, 0.0)


def _numbers(*values: Tensor) -> tuple[list[Any], type[_FloatMath] | type[_TensorMath]]:
    """``values`` as Python floats, with :class:`_FloatMath`, when they are all 0-d CPU tensors;
    else unchanged, with :class:`_TensorMath`. A per-tensor range's scalar arithmetic (some sixty
    operations per call) then takes nanoseconds an operation instead of the microseconds of a
    0-d tensor operation: about a tenth of a ResNet-20 training step here for DSQ's 38
    quantizers. No GPU synchronisation: tensors off the CPU stay tensors."""
    if all(v.dim() == 0 for v in values) and values[0].device.type == "cpu":
        return torch.stack([v.detach() for v in values]).tolist(), _FloatMath
    return list(values), _TensorMath


def _dsq_forward(x: Tensor, lower: Tensor, upper: Tensor, delta: Tensor) -> Tensor:
    return torch.round((torch.clamp(x, lower, upper) - lower) / delta) * delta + lower


def _dsq_backward(
    grad: Tensor, x: Tensor, lower: Tensor, upper: Tensor, delta: Tensor, kappa: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The compiled backward: ``dx`` and the partial derivatives at fixed ``Delta``, ``kappa``."""
    clamped = torch.clamp(x, lower, upper)
    t = (clamped - lower) / delta
    inside = clamped == x
    above = x > upper
    s, ds, _ = _dsq_constants(kappa, _TensorMath)
    r = torch.frac(t) - 0.5
    # tanh(y) = 1 - 2 d, 1 - tanh^2(y) = 4 d (1 - d), d = 1 / (exp(2 y) + 1): one exp, which
    # compiles to a loop twice as fast as tanh's (|y| <= kappa / 2 < 5, no overflow)
    d = 1.0 / (torch.exp(2.0 * kappa * r) + 1.0)
    th = 1.0 - 2.0 * d
    sech2 = 4.0 * d * (1.0 - d)
    slope = grad * sech2 * (0.5 * s * kappa)  # g phi' / 2
    grad_x = torch.where(inside, slope, 0.0)
    grad_upper = _sum_to(torch.where(above, slope, 0.0), delta)
    not_below = torch.where(inside | above, slope, 0.0)
    grad_lower = _sum_to(grad - not_below, delta)
    grad_delta = _sum_to(grad * (t - r + 0.5 * s * th) - not_below * t, delta)
    grad_kappa = (_sum_to(grad * (ds * th + s * r * sech2), delta) * (0.5 * delta)).sum()
    return grad_x, grad_lower, grad_upper, grad_delta, grad_kappa


def _dsq_eager_forward(x: Tensor, low: Any, up: Any, step: Any) -> Tensor:
    """The hard values ``l + Delta round((clamp(x, l, u) - l) / Delta)`` in one fresh tensor;
    ``low``/``up``/``step`` floats or per-channel views."""
    # clamp_min then clamp_max_: clamp with two tensor bounds takes a slow path on the CPU
    # (1.4 against 0.5 ms on a 128x16x32x32 tensor here)
    out = torch.clamp_min(x, low).clamp_max_(up)
    return out.sub_(low).div_(step).round_().mul_(step).add_(low)


def _dsq_sums(
    grad: Tensor, x: Tensor, range_: list[Any], slope: Any, like: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """The eager backward's full-size work, from the saved input: ``dx = slope y`` with ``y = g
    (1 - tanh^2) / 4`` on the inside elements (0 outside), and nine sums (per channel when
    ``like`` is) of ``g``, ``y`` and the inside ``g`` against ``1``, ``t``, ``f = frac(t)``
    (``r = f - 1/2``) and ``sigma = sigmoid(2 kappa r)``, in the order :func:`_dsq_partials`
    takes them. ``tanh(kappa r) = 2 sigma - 1`` and ``1 - tanh^2 = 4 sigma (1 - sigma)``:
    PyTorch's CPU sigmoid is ~4x faster than its tanh."""
    low, up, step, kappa = range_[:4]
    t = torch.clamp_min(x, low).clamp_max_(up)
    inside = _inside_mask(t, x)
    t.sub_(low).div_(step)
    f = torch.frac(t)
    sigma = torch.mul(f, 2.0 * kappa).sub_(kappa).sigmoid_()
    inside_g = grad * inside
    y = torch.ops.aten.sigmoid_backward(inside_g, sigma)
    sums = [
        _sum_to(grad, like),
        _sum_to(inside_g, like),
        _sum_to_dot(grad, t, like),
        _sum_to_dot(inside_g, t, like),
        _sum_to_dot(grad, sigma, like),
        _sum_to_dot(grad, f, like),
        _sum_to(y, like),
        _sum_to_dot(y, f, like),
        _sum_to_dot(y, t, like),
    ]
    return y.mul_(slope), sums


def _dsq_constants(kappa: Any, m: Any) -> tuple[Any, Any, Any]:
    """``s = 1 / tanh(kappa / 2)``, ``ds/dkappa = -(s^2 - 1) / 2`` and ``slope = 2 s kappa``
    (``phi' / 2 = s kappa (1 - tanh^2) / 2 = slope sigma (1 - sigma)``)."""
    s = 1.0 / m.tanh(0.5 * kappa)
    return s, -0.5 * (s * s - 1.0), 2.0 * s * kappa


def _dsq_partials(
    sums: list[Any], t_top: Any, step: Any, kappa: Any, constants: tuple[Any, Any, Any], m: Any
) -> list[Any]:
    """``[dl, du, dDelta, dkappa]`` (partial derivatives at fixed ``Delta`` and ``kappa``)
    from :func:`_dsq_sums`' sums, on floats or tensors (``m``: :class:`_FloatMath` or
    :class:`_TensorMath`). The clipped elements all sit at ``t = 0`` (below ``l``) or ``t = t_top
    = (u - l) / Delta`` (above ``u``), so their ``t``, ``f`` and ``sigma`` are constants: the
    totals of ``g`` above and below follow from two sums, and the inside-only sums from the
    whole ones. ``constants``: :func:`_dsq_constants`."""
    sum_g, sum_inside_g, g_t, inside_g_t, g_sigma, g_f, sum_y, y_f, y_t = sums
    s, ds, slope = constants
    g_above = (g_t - inside_g_t) * m.reciprocal_or_zero(t_top)
    g_below = sum_g - sum_inside_g - g_above
    top_sigma = 1.0 / (1.0 + m.exp(kappa * (1.0 - 2.0 * m.frac(t_top))))
    below_sigma = 1.0 / (1.0 + m.exp(kappa))
    grad_upper = g_above * slope * top_sigma * (1.0 - top_sigma)
    g_tanh = 2.0 * g_sigma - sum_g
    inside_g_tanh = g_tanh - g_above * (2.0 * top_sigma - 1.0) - g_below * (2.0 * below_sigma - 1.0)
    g_r, y_r = g_f - 0.5 * sum_g, y_f - 0.5 * sum_y
    # phi's kappa-derivative vanishes at the interval ends: inside elements only
    grad_kappa = m.total((ds * inside_g_tanh + 4.0 * s * y_r) * (0.5 * step))
    grad_delta = g_t - g_r + 0.5 * s * g_tanh - t_top * grad_upper - slope * y_t
    grad_lower = sum_g - slope * sum_y - grad_upper
    return [grad_lower, grad_upper, grad_delta, grad_kappa]


@functools.cache
def _dsq_bounds(dtype: torch.dtype) -> tuple[float, float, float]:
    """The minimum width and the alpha range rounded to ``dtype``, as the clamps compare them
    (``1e-4`` in float32 is ``9.99999974738e-05``: an alpha of ``1e-4`` sits on the bound)."""
    bounds = torch.tensor([DSQ_MIN_WIDTH, *DSQ_ALPHA_RANGE], dtype=dtype).tolist()
    return bounds[0], bounds[1], bounds[2]


def _dsq_chain(
    partials: list[Any],
    width: Any,
    alpha: Any,
    kappa: Any,
    num_steps: int,
    dtype: torch.dtype,
    m: Any,
) -> list[Any]:
    """``[dl, du, dalpha]`` from the partials ``[dl, du, dDelta, dkappa]`` through ``Delta =
    max(u - l, min width) / n`` and ``kappa = log(2 / alpha_c - 1)``, ``alpha_c`` clamped:
    ``dkappa / dalpha_c = -2 / (alpha_c (2 - alpha_c)) = -(1 + cosh kappa)``. The clamps pass
    the gradient on their bounds, as ``torch.clamp`` does; ``dtype`` is the range's."""
    grad_lower, grad_upper, grad_delta, grad_kappa = partials
    min_width, low, high = _dsq_bounds(dtype)
    grad_width = grad_delta * (width >= min_width) / num_steps
    kappa_slope = -(1.0 + 0.5 * (m.exp(kappa) + m.exp(-kappa)))
    grad_alpha = grad_kappa * kappa_slope * (alpha >= low) * (alpha <= high)
    return [grad_lower - grad_width, grad_upper + grad_width, grad_alpha]


class DSQFakeQuantize(torch.autograd.Function):
    """DSQ's hard forward ``l + Delta round((clamp(x, l, u) - l) / Delta)`` with the gradient of
    its soft staircase ``Q_S = l + Delta (i + 1/2 + phi / 2)``, ``phi = s tanh(kappa r)``,
    ``s = 1 / tanh(kappa / 2)``, where ``t = (clamp(x, l, u) - l) / Delta``, ``i`` its interval
    and ``r = t - i - 1/2`` (Gong et al., Eq. 3-5; ``kappa = k Delta = log(2 / alpha - 1)``,
    ``Delta = (u - l) / n``: :func:`dsq_step`, :func:`dsq_kappa`).

    Partial derivatives at fixed ``Delta`` and ``kappa`` (:func:`_dsq_partials`), which
    :func:`_dsq_chain` carries on to ``l``, ``u`` and ``alpha``:

    - ``dx = g phi' / 2`` inside ``[l, u]``, 0 outside, with ``phi' = s kappa (1 - tanh^2)``;
    - ``du = sum(g phi' / 2)`` over the elements above ``u`` (clipped to ``u``);
    - ``dl = sum(g) - sum(dx) - du`` (shifting ``x``, ``l`` and ``u`` together shifts ``Q_S``);
    - ``dDelta = sum(g (i + 1/2 + phi / 2) - g phi' t / 2)``;
    - ``dkappa = sum(g Delta / 2 (s' tanh + s r (1 - tanh^2)))``, ``s' = -(s^2 - 1) / 2``.

    The range's own arithmetic runs inside the function, not as autograd operations, and on
    Python floats for a per-tensor range on the CPU (:func:`_numbers`). Sums run per channel
    (axis 0) when ``lower`` and ``upper`` are per-channel vectors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        lower: Tensor,
        upper: Tensor,
        alpha: Tensor,
        num_steps: int,
        compiled: bool,
    ) -> Tensor:
        width = upper - lower
        delta, kappa = dsq_step(width, num_steps), dsq_kappa(alpha)
        ctx.num_steps = num_steps
        ctx.range_shape, ctx.alpha_shape = lower.shape, alpha.shape
        ctx.range_dtype = lower.dtype
        low, up, step, width = (_channel_view(v, x) for v in (lower, upper, delta, width))
        if _compiles("dsq", compiled):
            ctx.compiled = True
            ctx.save_for_backward(x, low, up, step, kappa, width, alpha)
            return _run("dsq", "forward", _dsq_forward, x, low, up, step)
        ctx.compiled = False
        # t_top, the t of the elements above u, as the forward computes it (in x's precision)
        t_top = width / step
        ctx.range, ctx.math = _numbers(low, up, step, kappa, width, alpha, t_top)
        low, up, step = ctx.range[:3]
        # the input, not t and the inside mask: one fresh tensor instead of three (its producer,
        # a ReLU or batch norm, mostly keeps it alive anyway); the backward recomputes them
        ctx.save_for_backward(x)
        return _dsq_eager_forward(x, low, up, step)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        if ctx.compiled:
            x, low, up, step, kappa, width, alpha = ctx.saved_tensors
            grad_x, *partials = _run(
                "dsq", "backward", _dsq_backward, grad, x, low, up, step, kappa
            )
            (*partials, width, alpha, kappa), m = _numbers(*partials, width, alpha, kappa)
        else:
            (x,) = ctx.saved_tensors
            _, _, step, kappa, width, alpha, t_top = ctx.range
            m = ctx.math
            like = step if isinstance(step, Tensor) else x.new_zeros(())
            constants = _dsq_constants(kappa, m)
            grad_x, sums = _dsq_sums(grad, x, ctx.range, constants[2], like)
            partials = _dsq_partials(_numbers(*sums)[0], t_top, step, kappa, constants, m)
        grad_lower, grad_upper, grad_alpha = (
            torch.as_tensor(value, dtype=grad.dtype, device=grad.device).reshape(shape)
            for value, shape in zip(
                _dsq_chain(partials, width, alpha, kappa, ctx.num_steps, ctx.range_dtype, m),
                (ctx.range_shape, ctx.range_shape, ctx.alpha_shape),
            )
        )
        return grad_x, grad_lower, grad_upper, grad_alpha, None, None


def _sum_to_dot(a: Tensor, b: Tensor, like: Tensor) -> Tensor:
    """``_sum_to(a * b, like)``, as one dot product when ``like`` is 0-d."""
    return _dot(a, b) if like.dim() == 0 else _sum_to(a * b, like)


def dsq_fake_quantize(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    alpha: Tensor,
    num_steps: int,
    compiled: bool = False,
) -> Tensor:
    """DSQ's hard quantizer with its soft-staircase gradients (:class:`DSQFakeQuantize`);
    ``lower``/``upper`` 0-d or per channel (axis 0), ``alpha`` 0-d, ``num_steps = 2**b - 1``;
    ``compiled``: through ``torch.compile``."""
    return DSQFakeQuantize.apply(x, lower, upper, alpha, num_steps, compiled)

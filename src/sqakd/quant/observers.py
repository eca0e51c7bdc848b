"""Calibration observers: the range a quantizer starts from, chosen from the tensors it sees.

By default (``QuantPolicy.observer: native``) each quantizer sets its range with its own rule at
initialisation (LSQ ``2 mean|x| / sqrt(Qp)``, EWGS ``3 std``, ...). An observer replaces that rule
for the quantizers that take a range (:attr:`~sqakd.quant.Quantizer.range_kind`), through
:meth:`~sqakd.quant.Quantizer.set_range`, as post-training quantization toolkits do:

* ``minmax``: the tensor's extremes: ``c = max|x|`` (symmetric), ``c = max(x)`` (unsigned),
  ``[min(x), max(x)]`` (asymmetric);
* ``percentile``: the ``p``-th percentile instead of the maximum (``p = 99.99`` by default): of
  ``|x|`` (symmetric), of ``x`` (unsigned), of ``x`` on each side (asymmetric: the ``100 - p``-th
  and the ``p``-th); linear interpolation between order statistics, as ``torch.quantile``;
* ``mse``: the range that minimises the mean squared quantization error ``mean((x - Q(x))**2)``
  over the observed tensor, where ``Q`` is the quantizer's own grid with that range
  (:meth:`~sqakd.quant.Quantizer.grid`, its levels in ``x``'s units): a search over ``f *
  (min/max range)`` for ``f`` in 1/100 .. 1 in steps of 1/100, then in steps of 1/2000 within
  1/100 of the best (MQBench's and PPQ's MSE observers search such a grid of fractions of the
  min/max range).

Over several calibration batches (``train.calibration_batches``, :func:`~sqakd.quant.calibrate`'s
``max_batches``), an activation quantizer's range combines the per-batch ranges
(:func:`combine_ranges`): ``minmax`` takes their extremes (exactly the min/max of all batches),
``percentile`` and ``mse`` their mean (the per-batch mean of MQBench's and PPQ's percentile and
MSE observers, which average over batches rather than keep every tensor). Weights are the same
tensor in every batch; ``native`` keeps each quantizer's rule on the first batch.

Asymmetric ranges always contain 0 (``low <= 0 <= high``). Per-channel quantizers get one range
per output channel (axis 0). Quantizers that take no range (DoReFa and PACT weights, APoT's
non-uniform levels, ``binary``/``ternary``/``faqd4`` and ``minmax`` weights, which recompute
their scale at every forward) keep their own rule; :func:`~sqakd.quant.prepare` says so in one
warning line, and refuses an observer that no quantizer of the model would use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .base import Observer, Quantizer

#: the default of ``QuantPolicy.observer_percentile``
DEFAULT_PERCENTILE = 99.99
#: the MSE search: coarse fractions k / COARSE_STEPS, then FINE_STEPS either side of the best
COARSE_STEPS, FINE_STEPS = 100, 20

_OBSERVERS: dict[str, Callable[..., Observer]] = {}
#: how an observer's ranges over several batches become one: their extremes or their mean
Combine = Literal["extremes", "mean"]


def register_observer(name: str) -> Callable[[type], type]:
    """Class decorator: make an observer available under ``name`` (built with the policy's
    observer options as keywords, each class taking the ones it uses)."""

    def add(cls: type) -> type:
        if name in _OBSERVERS:
            raise ValueError(f"observer {name!r} is registered twice")
        _OBSERVERS[name] = cls
        return cls

    return add


def available_observers() -> list[str]:
    """The registered observer names, plus ``native`` (each quantizer's own rule)."""
    return ["native", *sorted(_OBSERVERS)]


def build_observer(name: str, percentile: float = DEFAULT_PERCENTILE) -> Observer | None:
    """The observer ``name`` (``None`` for ``native``); ``percentile`` for ``percentile``."""
    if name == "native":
        return None
    if name not in _OBSERVERS:
        raise ValueError(
            f"unknown observer {name!r}; choose one of: {', '.join(available_observers())}"
        )
    if name == "percentile":
        return _OBSERVERS[name](percentile)
    return _OBSERVERS[name]()


def combine_ranges(
    observer: Observer, ranges: Sequence[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """One range from per-batch ``(low, high)`` ranges: the lowest low and highest high for an
    observer whose ``combine`` is ``extremes`` (``minmax``), else the mean of each side."""
    if not ranges:
        raise ValueError("no range to combine: calibrate on at least one batch")
    lows = torch.stack([low for low, _ in ranges])
    highs = torch.stack([high for _, high in ranges])
    if getattr(observer, "combine", "mean") == "extremes":
        return lows.amin(0), highs.amax(0)
    return lows.mean(0), highs.mean(0)


# ---------------------------------------------------------------------------------- the ranges
def rows(quantizer: Quantizer, x: Tensor) -> Tensor:
    """``x`` as one row per range: ``(C, -1)`` per channel (axis 0), ``(1, -1)`` per tensor."""
    x = x.detach()
    if quantizer.per_channel:
        return x.movedim(quantizer.channel_axis, 0).reshape(x.shape[quantizer.channel_axis], -1)
    return x.reshape(1, -1)


def _as_range(quantizer: Quantizer, value: Tensor) -> Tensor:
    """A per-row value as the quantizer's range shape: ``(C,)`` per channel, 0-d per tensor."""
    return value if quantizer.per_channel else value[0]


def _sides(quantizer: Quantizer, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``(low, high)`` as the quantizer's kind reads them (``-c``/``0`` for the low
    side of a symmetric/unsigned range; an asymmetric range widened to contain 0)."""
    kind = quantizer.range_kind
    if kind == "symmetric":
        return -high, high
    if kind == "unsigned":
        return torch.zeros_like(high), high
    return low.clamp(max=0.0), high.clamp(min=0.0)


def order_statistic(values: Tensor, fraction: float) -> Tensor:
    """Per row of ``values`` (2-d), the ``fraction`` quantile with linear interpolation between
    the sorted values (``torch.quantile``'s default), through ``kthvalue`` (no size limit)."""
    count = values.shape[1]
    position = fraction * (count - 1)
    below = int(position)
    above = min(below + 1, count - 1)
    lower = values.kthvalue(below + 1, dim=1).values
    if above == below or position == below:
        return lower
    upper = values.kthvalue(above + 1, dim=1).values
    return lower + (upper - lower) * (position - below)


@register_observer("minmax")
@dataclass(frozen=True)
class MinMaxObserver:
    """The extremes of the tensor (of ``|x|`` for a symmetric range)."""

    combine: ClassVar[Combine] = "extremes"

    def __call__(self, quantizer: Quantizer, x: Tensor) -> tuple[Tensor, Tensor]:
        values = rows(quantizer, x)
        if quantizer.range_kind == "symmetric":
            low, high = _sides(quantizer, values.amin(1), values.abs().amax(1))
        else:
            low, high = _sides(quantizer, values.amin(1), values.amax(1))
        return _as_range(quantizer, low), _as_range(quantizer, high)


@register_observer("percentile")
@dataclass(frozen=True)
class PercentileObserver:
    """The ``percentile``-th percentile of ``|x|`` (symmetric) or of ``x`` (each side)."""

    percentile: float = DEFAULT_PERCENTILE
    combine: ClassVar[Combine] = "mean"

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(
                f"observer percentile must be above 50 and at most 100, got {self.percentile}; "
                f"try 99.99"
            )

    def __call__(self, quantizer: Quantizer, x: Tensor) -> tuple[Tensor, Tensor]:
        values = rows(quantizer, x)
        fraction = self.percentile / 100.0
        if quantizer.range_kind == "symmetric":
            high = order_statistic(values.abs(), fraction)
            low = -high
        else:
            high = order_statistic(values, fraction)
            low = order_statistic(values, 1.0 - fraction)
        low, high = _sides(quantizer, low, high)
        return _as_range(quantizer, low), _as_range(quantizer, high)


@register_observer("mse")
@dataclass(frozen=True)
class MSEObserver:
    """The range ``f * (min/max range)`` with the least mean squared error on the quantizer's
    grid: ``f = k / coarse`` for ``k = 1..coarse``, then ``fine`` steps of ``1 / (coarse *
    fine)`` either side of the best ``f`` (per channel for a per-channel quantizer). The search
    sets each candidate range on the quantizer; :meth:`~sqakd.quant.Quantizer.calibrate` then
    sets the chosen one."""

    coarse: int = COARSE_STEPS
    fine: int = FINE_STEPS
    combine: ClassVar[Combine] = "mean"

    def __call__(self, quantizer: Quantizer, x: Tensor) -> tuple[Tensor, Tensor]:
        values = rows(quantizer, x)
        low, high = (side.reshape(-1) for side in MinMaxObserver()(quantizer, x))  # per row
        options = {"dtype": values.dtype, "device": values.device}
        coarse = torch.arange(1, self.coarse + 1, **options) / self.coarse
        best = _least_error(quantizer, values, low, high, coarse.expand(len(low), -1))
        step = 1.0 / (self.coarse * self.fine)
        offsets = torch.arange(-self.fine, self.fine + 1, **options) * step
        fine = (best.unsqueeze(1) + offsets).clamp(step, 1.0)
        best = _least_error(quantizer, values, low, high, fine)
        return _as_range(quantizer, best * low), _as_range(quantizer, best * high)


def _least_error(
    quantizer: Quantizer, values: Tensor, low: Tensor, high: Tensor, fractions: Tensor
) -> Tensor:
    """Per row, the fraction (of that row of ``fractions``) whose range ``f * [low, high]`` gives
    the least squared error; the first of equal ones."""
    ranges = [(_as_range(quantizer, f * low), _as_range(quantizer, f * high)) for f in fractions.T]
    errors = torch.stack([squared_error(quantizer, values, *pair) for pair in ranges])
    return fractions.gather(1, errors.argmin(dim=0).unsqueeze(1)).squeeze(1)


def squared_error(quantizer: Quantizer, values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Per row of ``values``, ``mean((x - Q(x))**2)`` on the quantizer's grid with range
    ``[low, high]``: ``Q(x) = (clamp(round(x / s + z), qmin, qmax) - z) * s`` with the grid's
    input scale ``s`` and zero point ``z``, the levels in ``x``'s units. Sets the range."""
    quantizer.set_range(low, high)
    grid = quantizer.grid()
    scale = grid.input_scale.reshape(-1, 1).to(values)
    zero_point = grid.input_zero_point.reshape(-1, 1).to(values)
    error = (values / scale).add_(zero_point).round_().clamp_(grid.qmin, grid.qmax)  # codes
    error.sub_(zero_point).mul_(scale).sub_(values)  # in place: one tensor of x's size
    return error.square_().mean(dim=1)

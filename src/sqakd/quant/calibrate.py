"""Data-driven initialisation of every quantizer in a prepared model."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .base import Quantizer, refuse_reduced_float_model
from .layers import QuantizedLayer, quantized_layers
from .observers import combine_ranges

#: dict keys tried, in order, for a dict batch when no ``input_key`` is given
INPUT_KEYS = ("input", "inputs", "images", "image", "x", "input_ids", "pixel_values")


def batch_inputs(
    batch: Any,
    input_key: str | None = None,
    batch_to_inputs: Callable[[Any], Any] | None = None,
) -> tuple[Tensor, ...]:
    """The model's positional inputs in one batch as PyTorch users hold it: a tensor; an
    ``(inputs, labels, ...)`` tuple or list (its first item); a dict (its ``input_key`` item, by
    default the first of :data:`INPUT_KEYS` present); or whatever ``batch_to_inputs(batch)``
    returns (a tensor or a tuple of the model's arguments)."""
    if batch_to_inputs is not None:
        inputs = batch_to_inputs(batch)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    elif isinstance(batch, Tensor):
        inputs = (batch,)
    elif isinstance(batch, Mapping):
        keys = [input_key] if input_key is not None else [k for k in INPUT_KEYS if k in batch]
        if not keys or keys[0] not in batch:
            wanted = (
                repr(input_key) if input_key is not None else "none of " + ", ".join(INPUT_KEYS)
            )
            raise ValueError(
                f"the dict batch has {wanted}; its keys are {', '.join(map(repr, batch))}: give "
                f"input_key (one of those) or batch_to_inputs"
            )
        inputs = (batch[keys[0]],)
    elif isinstance(batch, (tuple, list)) and batch:
        return batch_inputs(batch[0], input_key, None)
    else:
        inputs = (batch,)
    if not all(isinstance(item, Tensor) for item in inputs):
        kinds = ", ".join(type(item).__name__ for item in inputs)
        raise ValueError(
            f"a batch gave model inputs of type {kinds}, not tensors; give tensors, (inputs, "
            f"labels) pairs, dicts with input_key, or batch_to_inputs"
        )
    return inputs


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int = 1,
    input_key: str | None = None,
    batch_to_inputs: Callable[[Any], Any] | None = None,
) -> int:
    """Run up to ``max_batches`` batches through ``model`` in eval mode so that every
    quantized layer initialises its quantizers from real data (the released code does this on
    the first training batch). Batch-norm statistics are left untouched. Returns the number of
    batches used.

    Each layer calibrates on the first batch; with an observer (``QuantPolicy.observer`` other
    than ``native``) and ``max_batches > 1``, every activation range is then the observer's
    ranges of all the batches combined (:class:`BatchRanges`; ``minmax``: their extremes,
    ``percentile``/``mse``: their mean).

    ``batches``: any iterable of input tensors, ``(inputs, labels)`` tuples or lists (a standard
    ``DataLoader``), or dicts (the input under ``input_key``, by default ``input``, ``images``,
    ``input_ids``, ...; see :func:`batch_inputs`); ``batch_to_inputs(batch)`` maps anything
    else to the model's inputs. A model cast to bfloat16 or float16 is refused (one line naming
    the fix: keep it float32 and train with ``run.precision: bf16``).
    """
    refuse_reduced_float_model(model, "sqakd.calibrate")
    was_training = model.training
    model.eval()
    used = 0
    observed = BatchRanges(model) if max_batches > 1 else None
    negatives = ClippedNegatives(model)
    try:
        for batch in batches:
            if used >= max_batches:
                break
            device = next(model.parameters()).device
            inputs = batch_inputs(batch, input_key, batch_to_inputs)
            inputs = tuple(item.to(device) for item in inputs)
            if observed is not None:
                observed.batch = used
                if used == 0:
                    observed.first = inputs
            model(*inputs)
            used += 1
            negatives.remove()  # the first batch is enough to tell
        if observed is not None:
            observed.remove()  # before apply's own forward
            observed.apply(model)
        negatives.report()
    finally:
        if observed is not None:
            observed.remove()
        negatives.remove()
        model.train(was_training)
    if used == 0:
        raise ValueError("calibration got no batch; give at least one batch of input images")
    return used


#: the share of a layer's input below 0 from which :class:`ClippedNegatives` reports the layer
NEGATIVE_SHARE = 0.01


class ClippedNegatives:
    """Layers whose input is partly negative while their activation grid's lowest level is 0,
    so that every negative input becomes 0 (an unsigned LSQ/DSQ/PACT/DoReFa grid in front of
    attention, a linear bottleneck or normalised images): :meth:`report` names them in one
    warning line with the fix. Looks at the first calibration batch (forward pre-hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = dict(quantized_layers(model))
        self.minimum: dict[str, tuple[float, Tensor]] = {}  # name -> (share below 0, min)
        self._handles = [
            layer.register_forward_pre_hook(functools.partial(self._look, name))
            for name, layer in self.layers.items()
            if layer.act_quantizer is not None
        ]

    def _look(self, name: str, layer: QuantizedLayer, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        if name not in self.minimum and layer.quantization_enabled and x.numel():
            share = float((x < 0).float().mean())
            self.minimum[name] = (share, x.amin().reshape([1] * x.dim()).float())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def report(self) -> None:
        clipped = []
        for name, (share, minimum) in self.minimum.items():
            quantizer = self.layers[name].act_quantizer
            if share >= NEGATIVE_SHARE and quantizer is not None and quantizer.is_initialized:
                if lowest_level(quantizer, minimum) >= 0:
                    clipped.append(f"{name or 'model'} ({share:.0%} below 0, down to "
                                   f"{float(minimum):.3g})")  # fmt: skip
        if clipped:
            shown = ", ".join(clipped[:3]) + (
                f" and {len(clipped) - 3} more" if len(clipped) > 3 else ""
            )
            warnings.warn(
                f"sqakd.calibrate: {len(clipped)} layer(s) get negative inputs that their "
                f"activation grid (lowest level 0) turns into 0: {shown}; to keep them, give "
                "a grid with negative levels: quant.act_options: {signed: true} (lsq, dsq, "
                "apot), quant.act_method: lsq+, or quant.observer: minmax (ewgs, ste)",
                UserWarning,
                stacklevel=3,
            )


def lowest_level(quantizer: Quantizer, minimum: Tensor) -> float:
    """The lowest input an activation quantizer can represent, in its input's units: from its
    grid (``(qmin - zero_point) * scale``; EWGS's forward gives levels in [0, 1], not in the
    input's units), else what it makes of ``minimum``, the most negative input seen."""
    try:
        grid = quantizer.grid()
    except NotImplementedError:
        return float(quantizer(minimum).min())
    return float(((grid.qmin - grid.input_zero_point) * grid.input_scale).min())


class BatchRanges:
    """Over several calibration batches, the observer's range of each batch entering every
    quantized layer that is not yet calibrated and whose activation quantizer has an observer
    (forward pre-hooks); :meth:`apply` then sets each such quantizer's range to the ranges
    combined (:func:`~sqakd.quant.observers.combine_ranges`) and, where the weight quantizer
    matches the layer's output (EWGS's output scale, set on the first batch with the first
    batch's range), runs the first batch again to match it with the new ranges. One batch gives
    exactly what it gave before; already-calibrated layers (a loaded checkpoint) are left
    alone."""

    def __init__(self, model: nn.Module) -> None:
        self.batch = 0
        self.first: tuple[Tensor, ...] = ()  # the first batch's model inputs
        self.ranges: dict[Quantizer, dict[int, tuple[Tensor, Tensor]]] = {}
        self._handles: list[RemovableHandle] = []
        for _, layer in quantized_layers(model):
            quantizer = layer.act_quantizer
            if (
                quantizer is None
                or quantizer.observer is None
                or quantizer.range_kind is None
                or bool(layer.calibrated)
            ):
                continue
            self.ranges[quantizer] = {}
            self._handles.append(layer.register_forward_pre_hook(self._observe))

    def _observe(self, layer: QuantizedLayer, args: tuple[Any, ...]) -> None:
        if not layer.quantization_enabled:
            return
        quantizer = layer.act_quantizer
        kept = {name: value.clone() for name, value in quantizer.state_dict().items()}
        # the observer may set candidate ranges on the quantizer (mse): put its state back
        self.ranges[quantizer][self.batch] = quantizer.observer(quantizer, args[0].detach().float())
        quantizer.load_state_dict(kept)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def apply(self, model: nn.Module) -> None:
        changed = []
        for quantizer, per_batch in self.ranges.items():
            if len(per_batch) > 1 and quantizer.is_initialized:
                ranges = [per_batch[batch] for batch in sorted(per_batch)]
                quantizer.set_range(*combine_ranges(quantizer.observer, ranges))
                changed.append(quantizer)
        rematch = [
            layer
            for _, layer in quantized_layers(model)
            if layer.act_quantizer in changed and matches_output(layer.weight_quantizer)
        ]
        if rematch and self.first:
            handles = [
                layer.register_forward_pre_hook(lambda layer, args: layer.calibrate_weight(args[0]))
                for layer in rematch
            ]
            try:
                model(*self.first)  # in forward order: each layer sees its final input
            finally:
                for handle in handles:
                    handle.remove()


def matches_output(quantizer: Quantizer | None) -> bool:
    """Whether ``quantizer`` sets state from the layer's output (overrides ``match_output``)."""
    return quantizer is not None and type(quantizer).match_output is not Quantizer.match_output


def reset_calibration(model: nn.Module) -> None:
    """Forget every quantizer's initialisation so the next forward (or calibrate) redoes it."""
    for _, layer in quantized_layers(model):
        layer.calibrated.fill_(False)
        for quantizer in (layer.weight_quantizer, layer.act_quantizer):
            if quantizer is not None:
                quantizer.initialized.fill_(False)

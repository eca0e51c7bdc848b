"""Data-driven initialisation of every quantizer in a prepared model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, refuse_reduced_float_model
from .layers import quantized_layers
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
    try:
        for batch in batches:
            if used >= max_batches:
                break
            device = next(model.parameters()).device
            inputs = batch_inputs(batch, input_key, batch_to_inputs)
            if observed is not None:
                observed.batch = used
            model(*(item.to(device) for item in inputs))
            used += 1
    finally:
        if observed is not None:
            observed.remove()
        model.train(was_training)
    if used == 0:
        raise ValueError("calibration got no batch; give at least one batch of input images")
    if observed is not None:
        observed.apply()
    return used


class BatchRanges:
    """Over several calibration batches, the observer's range of each batch entering every
    quantized layer that is not yet calibrated and whose activation quantizer has an observer
    (forward pre-hooks); :meth:`apply` then sets each such quantizer's range to the ranges
    combined (:func:`~sqakd.quant.observers.combine_ranges`). The layer itself calibrates on the
    first batch as usual (its weights, EWGS's output scale), so one batch gives exactly what
    it gave before; already-calibrated layers (a loaded checkpoint) are left alone."""

    def __init__(self, model: nn.Module) -> None:
        self.batch = 0
        self.ranges: dict[Quantizer, dict[int, tuple[Tensor, Tensor]]] = {}
        self._handles = []
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

    def _observe(self, layer: nn.Module, args: tuple[Any, ...]) -> None:
        if not getattr(layer, "quantization_enabled", True):
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

    def apply(self) -> None:
        for quantizer, per_batch in self.ranges.items():
            if len(per_batch) > 1 and quantizer.is_initialized:
                ranges = [per_batch[batch] for batch in sorted(per_batch)]
                quantizer.set_range(*combine_ranges(quantizer.observer, ranges))


def reset_calibration(model: nn.Module) -> None:
    """Forget every quantizer's initialisation so the next forward (or calibrate) redoes it."""
    for _, layer in quantized_layers(model):
        layer.calibrated.fill_(False)
        for quantizer in (layer.weight_quantizer, layer.act_quantizer):
            if quantizer is not None:
                quantizer.initialized.fill_(False)

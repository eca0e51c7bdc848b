"""Data-driven initialisation of every quantizer in a prepared model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .layers import quantized_layers


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor], max_batches: int = 1) -> int:
    """Run up to ``max_batches`` input batches through ``model`` in eval mode so that every
    quantized layer initialises its quantizers from real data (the released code does this on
    the first training batch). Batch-norm statistics are left untouched. Returns the number of
    batches used.
    """
    was_training = model.training
    model.eval()
    used = 0
    try:
        for batch in batches:
            if used >= max_batches:
                break
            device = next(model.parameters()).device
            model(batch.to(device))
            used += 1
    finally:
        model.train(was_training)
    if used == 0:
        raise ValueError("calibration got no batch; give at least one batch of input images")
    return used


def reset_calibration(model: nn.Module) -> None:
    """Forget every quantizer's initialisation so the next forward (or calibrate) redoes it."""
    for _, layer in quantized_layers(model):
        layer.calibrated.fill_(False)
        for quantizer in (layer.weight_quantizer, layer.act_quantizer):
            if quantizer is not None:
                quantizer.initialized.fill_(False)

"""Batch-norm statistics (BNS) loss: the generator's images should give every batch norm of the
teacher the statistics it saw in training (GDFQ, ZeroQ).

For each ``BatchNorm2d`` ``l`` of the teacher, with ``x_l`` its input on a generated batch::

    mu_l  = mean of x_l over (B, H, W)              (per channel)
    var_l = biased variance of x_l over (B, H, W)
    BNS   = 1/L * sum_l [ MSE(mu_l, running_mean_l) + MSE(var_l, running_var_l) ]

(MSE: mean over channels.) Forward pre-hooks on the batch norms compute each layer's term as the
teacher runs, so a single teacher forward gives the logits, the feature taps and BNS.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's 2-d batch norms that keep running statistics, in model order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        and module.track_running_stats
        and module.running_mean is not None
    ]


class BatchNormStatistics:
    """Hooks on every ``BatchNorm2d`` of ``model``; :meth:`loss` is BNS of the last forward.

    Not an ``nn.Module`` (the teacher's batch norms must not become the method's state)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm2d layers with running statistics, so "
                "there are no statistics to match generated images to (BNS); use a teacher with "
                "batch norms (not folded)"
            )
        self._model = model
        self._terms: list[Tensor] = []
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._start)]
        for _, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._hook))

    def _start(self, module: nn.Module, args: Any) -> None:
        if module is self._model:
            self._terms = []

    def _hook(self, module: nn.Module, args: Any) -> None:
        x = args[0].float()  # statistics in float32, also of a bfloat16 (autocast) forward
        mean = x.mean(dim=(0, 2, 3))
        variance = x.var(dim=(0, 2, 3), unbiased=False)
        self._terms.append(
            F.mse_loss(mean, module.running_mean) + F.mse_loss(variance, module.running_var)
        )

    def loss(self) -> Tensor:
        """BNS of the model's last forward (the mean over its batch-norm layers)."""
        if not self._terms:
            raise RuntimeError("no forward of the model has run since the BNS hooks were set")
        return torch.stack(self._terms).mean()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._terms = [], []

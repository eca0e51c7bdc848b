"""Shared weight initialisation for the architectures."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module, linear_std: float | None = None) -> None:
    """He initialisation for convolutions (``std = sqrt(2 / fan_out)``), BN weight 1 and bias 0,
    linear layers Kaiming-uniform (PyTorch default) or ``N(0, linear_std)``, biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

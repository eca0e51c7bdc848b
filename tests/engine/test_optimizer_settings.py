"""Optimizer settings reach the optimizer: Adam's betas (AKT's generator uses (0.5, 0.999))."""

from __future__ import annotations

from torch import nn

from sqakd.config import MethodConfig, OptimizerConfig
from sqakd.engine.optim import build_optimizer
from sqakd.methods import build_method


def test_betas_reach_adam_and_adamw():
    parameters = list(nn.Linear(2, 2).parameters())
    for name in ("adam", "adamw"):
        optimizer = build_optimizer(parameters, OptimizerConfig(name=name, betas=(0.5, 0.999)))
        assert optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    assert build_optimizer(parameters, OptimizerConfig()).param_groups[0]["betas"] == (0.9, 0.999)


def test_akt_gives_its_generator_the_released_adam():
    settings = build_method(MethodConfig(name="akt")).optimizer_settings(
        "generator", OptimizerConfig(name="sgd")
    )
    assert (settings.name, settings.lr, settings.betas, settings.weight_decay) == (
        "adam",
        1e-3,
        (0.5, 0.999),
        0.0,
    )

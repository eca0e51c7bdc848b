"""Optimizers and learning-rate schedules from their typed configuration."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimizerConfig

_OPTIMIZERS = {
    "adam": lambda params, c: torch.optim.Adam(
        params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay
    ),
    "adamw": lambda params, c: torch.optim.AdamW(
        params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay
    ),
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov
    ),
}


def build_optimizer(params: list[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    return _OPTIMIZERS[config.name](params, config)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: OptimizerConfig,
    total_steps: int,
    steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: cosine from ``lr`` to 0 over the run, constant, or step decay at epochs."""
    milestones = [m * steps_per_epoch for m in config.step_milestones]

    def factor(step: int) -> float:
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        if config.schedule == "step":
            return config.step_gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

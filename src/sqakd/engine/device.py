"""Device choice and reproducibility."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"run.device is {name!r} but this machine has no CUDA GPU; set run.device: cpu"
        )
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

"""Shared timing for the benchmark scripts: images per second of a training step."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            cpu = next(
                line.split(":", 1)[1].strip() for line in stream if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads"


def images_per_second(
    step: Callable[[], None], batch_size: int, warmup: int = 3, repeats: int = 10
) -> float:
    """Median-of-steps throughput of ``step`` (which runs one batch)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return batch_size / times[len(times) // 2]

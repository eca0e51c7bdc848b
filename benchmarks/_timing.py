"""Shared timing for the benchmark scripts: images per second of a training step."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from sqakd.quant.kernels import should_compile_kernels


def add_kernels_option(parser: argparse.ArgumentParser) -> None:
    """``--kernels auto|eager|compiled``: the quantizer kernels, as ``run.compile`` chooses them."""
    parser.add_argument(
        "--kernels",
        choices=["auto", "eager", "compiled"],
        default="auto",
        help="quantizer kernels: auto (the default run.compile: compiled when a C++ compiler is "
        "found), eager, or compiled through torch.compile",
    )


def compiled_kernels(choice: str) -> bool:
    """``choice`` (see :func:`add_kernels_option`) resolved as ``run.compile`` resolves it: the
    ``compiled_kernels`` argument of ``prepare`` (``True``: through ``torch.compile``)."""
    setting = {"auto": "auto", "eager": False, "compiled": True}[choice]
    return should_compile_kernels(setting, torch.device("cpu"))


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


def interleaved_medians(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    per_round: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Seconds per call of each step: median over ``rounds`` of the median of ``per_round``."""
    for step in steps.values():  # warm-up
        step(), step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times = []
            for _ in range(per_round):
                start = clock()
                step()
                times.append(clock() - start)
            samples[name].append(statistics.median(times))
    return {name: statistics.median(values) for name, values in samples.items()}

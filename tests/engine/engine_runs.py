"""Helpers for end-to-end runs of the real command line in subprocesses."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

TIMING_COLUMNS = {"images_per_s", "epoch_seconds"}


def quantize_args(root: Path, teacher: Path, output: Path, *extra: str) -> list[str]:
    """``sqakd quantize`` on the tiny data: global batch 8 (4 steps per epoch), SGD (whose
    updates are linear in the gradient, so float noise stays noise), one thread, deterministic."""
    settings = [
        f"data.root={root}", f"data.cache_dir={output.parent / 'cache'}", "data.batch_size=8",
        "data.eval_batch_size=4", "model.name=small_cnn", "model.kwargs={width: 8}",
        f"teacher.checkpoint={teacher}", "train.epochs=2", "train.weights.name=sgd",
        "train.weights.lr=0.05", "train.quantizers.name=sgd", "train.quantizers.lr=0.001",
        "run.progress=false", "run.deterministic=true", "run.threads=1", "quant.weight_bits=4",
        "quant.act_bits=4", "quant.first_last=float",
    ]  # fmt: skip
    args = ["quantize", "-o", str(output)]
    for setting in [*settings, *extra]:
        args += ["-s", setting]
    return args


def run_python(
    args: list[str], timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python <args>`` with one OpenMP thread in its own process group (killed whole,
    torchrun's workers included, if it overruns ``timeout``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            stderr += f"\n[killed after {timeout} s]"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def read_rows(folder: Path) -> list[dict[str, str]]:
    """metrics.csv without the timing columns (which differ between any two runs)."""
    with (folder / "metrics.csv").open() as stream:
        return [
            {k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in csv.DictReader(stream)
        ]


def read_model(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))

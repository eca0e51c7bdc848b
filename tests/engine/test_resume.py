"""Exact resume: a run killed with SIGKILL in the middle of an epoch and resumed with --resume
ends with bit-identical weights and metrics to an uninterrupted run; the pieces (random states,
mid-epoch counters, loader fast-forward) checked in one process."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_runs import quantize_args, read_model, read_rows, run_python
from torch import nn

from sqakd.config import MethodConfig, TrainConfig
from sqakd.engine import RunLog, Trainer, atomic_torch_save, safe_torch_load
from sqakd.engine.checkpoint import capture_rng_state, restore_rng_state
from sqakd.methods import build_method

# runs the real CLI, but SIGKILLs itself when step KILL_AT is about to start (mid-epoch, after
# the mid-epoch checkpoint of an earlier step was written)
KILLER = """
import os, signal, sys
from sqakd.engine import trainer

KILL_AT = int(os.environ["SQAKD_TEST_KILL_AT"])
original = trainer.Trainer.train_step

def train_step(self, batch):
    if self.step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, batch)

trainer.Trainer.train_step = train_step
from sqakd.cli import main
sys.argv[0] = "sqakd"
main()
"""


def draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.standard_normal()), torch.randn(3)


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leave a cached Gaussian in NumPy's state
    path = atomic_torch_save({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(safe_torch_load(path)["rng"])  # weights_only=True load
    again = draws()
    assert again[:2] == expected[:2]
    torch.testing.assert_close(again[2], expected[2], rtol=0, atol=0)


class Batches:
    """A loader without set_epoch/skip_batches: a mid-epoch resume drops the done batches."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def make_trainer(tmp_path: Path, batches, checkpoint_every_steps=None) -> Trainer:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    config = TrainConfig(epochs=2, checkpoint_every_steps=checkpoint_every_steps)
    return Trainer(student, None, build_method(MethodConfig(name="supervised")), Batches(batches),
                   config, torch.device("cpu"), RunLog(tmp_path, enabled=False),
                   checkpoint_dir=tmp_path / "checkpoints", progress=False)  # fmt: skip


def test_mid_epoch_checkpoint_resumes_at_the_next_batch_with_its_random_state(tmp_path, fit_until):
    """Dropout draws from torch's global generator: only a restored RNG state repeats them."""
    torch.manual_seed(5)
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 2, (4,))) for _ in range(3)]
    full = make_trainer(tmp_path / "full", batches)
    full.fit()
    interrupted = make_trainer(tmp_path / "cut", batches, checkpoint_every_steps=2)
    fit_until(interrupted, 4)
    state = safe_torch_load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 1, 4)
    assert len(state["history"]) == 1 and "loss" in state["epoch_sums"]
    resumed = make_trainer(tmp_path / "resumed", batches)
    torch.manual_seed(123)  # whatever the new process drew before: the checkpoint's state wins
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    result = resumed.fit()
    for key, value in full.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[key], value, rtol=0, atol=0)
    assert [row["train_loss"] for row in result.history] == [
        row["train_loss"] for row in full.result.history
    ]


def test_a_mid_epoch_checkpoint_needs_the_same_number_of_processes(tmp_path):
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 2, (4,))) for _ in range(2)]
    trainer = make_trainer(tmp_path, batches)
    state = trainer.state_dict()
    state.update(batch_in_epoch=1, world_size=2)
    with pytest.raises(ValueError, match="--nproc_per_node=2"):
        trainer.load_state_dict(state)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(
    image_tree: Path, teacher_weights: Path, tmp_path: Path
):
    """2 epochs x 4 steps, a checkpoint every 3 steps (epoch 1 batch 3, end of epoch 1, epoch 2
    batch 2); SIGKILL as step 8 starts, then --resume: same bits, same metrics."""
    every = "train.checkpoint_every_steps=3"
    reference = run_python(
        ["-m", "sqakd", *quantize_args(image_tree, teacher_weights, tmp_path / "full", every)]
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    args = quantize_args(image_tree, teacher_weights, tmp_path / "cut", every)
    killed = run_python([str(script), *args], env={"SQAKD_TEST_KILL_AT": "7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = safe_torch_load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 2, 6)
    assert not (tmp_path / "cut" / "model.safetensors").exists()

    resumed = run_python(["-m", "sqakd", *args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    full, cut = read_model(tmp_path / "full"), read_model(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for name in full:
        assert torch.equal(full[name], cut[name]), name
    assert read_rows(tmp_path / "cut") == read_rows(tmp_path / "full")
    summaries = [
        json.loads((tmp_path / run / "summary.json").read_text()) for run in ("full", "cut")
    ]
    for key in ("last", "best", "best_epoch"):
        assert summaries[0][key] == summaries[1][key]

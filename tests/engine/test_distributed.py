"""Multi-process training: two gloo processes under torchrun train exactly what one process
trains on the same global batches; plus the pieces (CPU SyncBatchNorm, sharded evaluation,
batch splitting) checked in one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_runs import quantize_args, read_model, read_rows, run_python
from safetensors.torch import load_file
from torch import nn

from sqakd.engine.distributed import (
    SINGLE_PROCESS,
    CPUSyncBatchNorm,
    DistributedContext,
    convert_sync_batchnorm,
    evaluate_sharded,
    init_distributed,
    per_rank_batch_size,
    rank_device,
    unwrap_model,
)


def test_without_torchrun_nothing_changes(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == (SINGLE_PROCESS, "cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu") == (SINGLE_PROCESS, "cpu")


def test_global_batch_is_split_evenly_or_refused():
    assert per_rank_batch_size(128, DistributedContext(1, 4)) == 32
    assert per_rank_batch_size(128, SINGLE_PROCESS) == 128
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        per_rank_batch_size(128, DistributedContext(0, 3))


def test_each_rank_gets_its_own_gpu_or_stays_on_cpu():
    assert rank_device("cuda", 3) == "cuda:3"
    assert rank_device("cpu", 3) == "cpu"
    with pytest.raises(ValueError, match="set run.device: cuda"):
        rank_device("cuda:1", 0)


def test_cpu_sync_batchnorm_is_batchnorm_outside_a_process_group():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    synced = convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.device("cpu")
    )
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], CPUSyncBatchNorm)
    assert synced[1].weight is not plain[1].weight
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced[1].running_var, plain[1].running_var)
    assert synced.state_dict().keys() == plain.state_dict().keys()


def test_unwrap_returns_the_plain_model():
    model = nn.Linear(2, 2)
    assert unwrap_model(model) is model


def test_single_process_sharded_evaluation_is_plain_evaluation():
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])) for _ in range(2)]
    from sqakd.engine import evaluate

    assert evaluate_sharded(model, batches, "cpu", SINGLE_PROCESS) == evaluate(model, batches)


def test_two_processes_train_the_same_weights_as_one(
    image_tree: Path, teacher_weights: Path, tmp_path: Path
):
    """torchrun --nproc_per_node=2 (gloo, per-rank batch 4, synchronised batch norm) against one
    process with batch 8: same weights, losses and test metrics within float tolerance."""
    # labeled QAT: cross-entropy gradients are far from zero, so float noise stays ~1e-7 (SQAKD's
    # KL starts near 0 with the student a copy of the teacher, where the same noise is ~1e-5 and
    # can move a 4-bit code across a rounding boundary)
    common = [
        "method.name=qat", "data.augment.crop_padding=0", "data.augment.flip=false",
        "run.sync_batchnorm=true",
    ]  # fmt: skip
    single = run_python(
        ["-m", "sqakd", *quantize_args(image_tree, teacher_weights, tmp_path / "one", *common)]
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sqakd",
         *quantize_args(image_tree, teacher_weights, tmp_path / "two", *common)]
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = read_model(tmp_path / "one"), read_model(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    start = load_file(str(teacher_weights))["conv2.weight"]  # the student really trained
    assert (one["conv2.weight"] - start).abs().max() > 1e-3
    rows_one, rows_two = read_rows(tmp_path / "one"), read_rows(tmp_path / "two")
    assert len(rows_one) == len(rows_two) == 2
    for row_one, row_two in zip(rows_one, rows_two):
        assert list(row_one) == list(row_two)
        for key in ("train_loss", "test_loss", "test_top1"):
            assert math.isclose(
                float(row_one[key]), float(row_two[key]), rel_tol=1e-4, abs_tol=1e-5
            )
    # rank 0 alone wrote the run folder; every rank evaluated its half of the test set
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["last"]["top1"] == pytest.approx(float(rows_one[-1]["test_top1"]), abs=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "last.pt").is_file()

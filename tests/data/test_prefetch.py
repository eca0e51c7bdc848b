"""Prefetching (data.prefetch_batches): the next batches are made in a background thread, and
the loader still yields the same batches, bit for bit, in the same order, also when resumed in
the middle of an epoch; the global random state is not touched; stopping early stops the thread;
an error in the thread reaches the caller; a run resumed mid-epoch ends bit-identical."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from sqakd.config import MethodConfig, TrainConfig
from sqakd.data import BatchAugment, BatchLoader, ImageArray
from sqakd.data.prefetch import prefetched
from sqakd.engine import RunLog, Trainer
from sqakd.methods import build_method


def images(n: int = 37) -> ImageArray:
    rng = np.random.default_rng(0)
    return ImageArray(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 5)


def loader(prefetch: int) -> BatchLoader:
    augment = BatchAugment(pad=2, flip=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    return BatchLoader(images(), batch_size=5, augment=augment, seed=3, prefetch=prefetch,
                       with_index=True)  # fmt: skip


def batches(source: BatchLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    source.set_epoch(epoch, start_batch=start)
    return list(source)


def same(first: list[tuple[torch.Tensor, ...]], second: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetched_batches_equal_the_plain_loaders_in_order_and_content(depth):
    plain, ahead = loader(0), loader(depth)
    for epoch in (0, 1, 2):
        same(batches(ahead, epoch), batches(plain, epoch))
    same(batches(ahead, 1, start=3), batches(plain, 1, start=3))  # a mid-epoch resume
    assert len(batches(ahead, 1, start=3)) == len(plain) - 3


def test_prefetching_draws_nothing_from_the_global_random_state():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches(loader(2), 0)
    assert torch.equal(torch.get_rng_state(), before)


def test_set_epoch_after_iter_does_not_reach_the_prefetching_thread():
    plain, ahead = loader(0), loader(2)
    ahead.set_epoch(4)
    started = iter(ahead)
    ahead.set_epoch(5)  # e.g. an epoch hook rewinding the loader
    same(list(started), batches(plain, 4))


def test_stopping_early_stops_the_thread():
    before = threading.active_count()
    source = iter(loader(2))
    next(source)
    assert threading.active_count() == before + 1
    source.close()  # what dropping a half-read epoch does (train.max_steps_per_epoch)
    assert threading.active_count() == before


def test_an_error_in_the_thread_is_raised_in_the_caller_at_its_item():
    def items():
        yield 1
        yield 2
        raise RuntimeError("batch 3 is broken")

    source = prefetched(items(), depth=2)
    assert next(source) == 1 and next(source) == 2
    with pytest.raises(RuntimeError, match="batch 3 is broken"):
        next(source)


def test_depth_zero_runs_in_the_callers_thread_and_negative_is_refused():
    items = iter([1, 2])
    assert prefetched(items, 0) is items
    with pytest.raises(ValueError, match=">= 0"):
        prefetched(iter([]), -1)
    with pytest.raises(ValueError, match="prefetch must be a whole number"):
        BatchLoader(images(), batch_size=4, prefetch=-1)


def trainer(folder, prefetch: int, checkpoint_every_steps: int | None = None):
    """Labeled training of a small network with dropout (draws from torch's global generator)
    on the augmented loader, 2 epochs of 7 batches, checkpoints in ``folder``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Dropout(0.3), nn.Linear(16, 5))
    source = BatchLoader(images(), batch_size=5, augment=BatchAugment(pad=2, flip=True), seed=3,
                         prefetch=prefetch)  # fmt: skip
    config = TrainConfig(epochs=2, checkpoint_every_steps=checkpoint_every_steps)
    return Trainer(model, None, build_method(MethodConfig(name="supervised")), source, config,
                   torch.device("cpu"), RunLog(folder, enabled=False),
                   checkpoint_dir=folder / "checkpoints", progress=False)  # fmt: skip


def test_a_prefetching_run_resumed_mid_epoch_ends_like_a_plain_uninterrupted_one(
    tmp_path, fit_until
):
    plain = trainer(tmp_path / "plain", prefetch=0)
    plain.fit()
    cut = trainer(tmp_path / "cut", prefetch=2, checkpoint_every_steps=3)
    fit_until(cut, 10)  # epoch 2, batch 3: prefetched batches are dropped with the process
    resumed = trainer(tmp_path / "resumed", prefetch=2)
    resumed.resume(tmp_path / "cut" / "checkpoints" / "last.pt")
    resumed.fit()
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)
    assert [r["train_loss"] for r in resumed.result.history] == [
        r["train_loss"] for r in plain.result.history
    ]

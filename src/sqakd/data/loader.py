"""Batches straight from one in-memory uint8 tensor: shuffling, sharding, resuming, augmentation.

Epoch ``e``'s order is a permutation drawn from a generator seeded by ``(seed, e)`` (the same on
every rank), so a run is reproducible and can resume from any epoch and batch. With
``shard=(rank, world_size)`` the permutation is padded by repeating its start to a multiple of
``world_size`` and rank r takes positions r, r + world_size, ... (as ``DistributedSampler``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .arrays import ImageArray
from .augment import BatchAugment, normalize
from .prefetch import prefetched


def _seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (no collisions like seed + epoch would give)."""
    return int(
        np.random.SeedSequence([int(part) for part in parts]).generate_state(1, np.uint64)[0] >> 1
    )


class BatchLoader:
    """Iterate over ``(images, labels)`` batches of ``data``.

    ``images`` is float32 (N, C, H, W) on ``device``: augmented by ``augment`` when given, else
    scaled to [0, 1] and normalised with ``mean``/``std`` when given. ``labels`` is int64 (N,), or
    ``None`` when ``with_labels=False``, in which case ``data.labels`` is never read. With
    ``with_index=True`` each batch is ``(images, labels, index)``, ``index`` holding every
    image's position in ``data`` (int64, on the CPU).

    Call :meth:`set_epoch` before each epoch; ``set_epoch(e, start_batch=k)`` (or
    :meth:`skip_batches`) makes the next iteration start at batch k of epoch e, yielding exactly
    the batches an uninterrupted run would have (augmentation is seeded per batch).

    ``prefetch=k`` (``data.prefetch_batches``) makes up to k batches ahead in a background
    thread (:func:`~sqakd.data.prefetch.prefetched`) while the caller trains on the current one;
    the batches are the same, in the same order, since each depends only on (seed, epoch, rank,
    batch) and no global random state is drawn.
    """

    def __init__(
        self,
        data: ImageArray,
        batch_size: int,
        shuffle: bool = True,
        augment: BatchAugment | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        with_labels: bool = True,
        shard: tuple[int, int] | None = None,
        with_index: bool = False,
        prefetch: int = 0,
    ) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a whole number >= 0, got {prefetch!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        rank, world_size = (0, 1) if shard is None else shard
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}"
            )
        if augment is not None and augment.mean is not None and mean is not None:
            raise ValueError(
                "normalisation is set twice: give mean/std to BatchAugment or to the loader, not both"
            )
        normalize(torch.zeros(1, data.images.shape[3], 1, 1), mean, std)  # validates mean/std early
        with warnings.catch_warnings():  # a read-only array (e.g. memory-mapped) is never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.images = torch.from_numpy(data.images).permute(0, 3, 1, 2)
            self.labels: Tensor | None = None
            if with_labels:
                labels = data.labels
                if labels is None:
                    raise ValueError(
                        "the data set has no labels; pass with_labels=False to iterate without them"
                    )
                self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.mean, self.std = mean, std
        self.drop_last = drop_last
        self.with_index = with_index
        self.prefetch = prefetch
        self.seed = seed
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0
        if self.images.shape[0] == 0:
            raise ValueError("the data set is empty")
        self.num_samples = math.ceil(self.images.shape[0] / world_size)
        if len(self) == 0:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {self.num_samples} samples of this shard with "
                "drop_last=True, so an epoch has no batches; lower batch_size or set drop_last false"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use epoch ``epoch``'s order for the next iteration, starting at batch ``start_batch``."""
        self.epoch = int(epoch)
        self.skip_batches(start_batch)

    def skip_batches(self, count: int) -> None:
        """Make the next iteration start at batch ``count`` of the current epoch (to resume)."""
        if not 0 <= count <= len(self):
            raise ValueError(f"cannot start at batch {count}: an epoch has {len(self)} batches")
        self.start_batch = int(count)

    def __len__(self) -> int:
        """Batches per epoch for this shard."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self, epoch: int | None = None) -> Tensor:
        """This shard's sample indices, in order, for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        total = self.images.shape[0]
        if self.shuffle:
            generator = torch.Generator().manual_seed(_seed(self.seed, epoch))
            order = torch.randperm(total, generator=generator)
        else:
            order = torch.arange(total)
        padded_length = self.num_samples * self.world_size
        if padded_length > total:
            repeats = math.ceil(padded_length / total)
            order = order.repeat(repeats + 1)[:padded_length]
        return order[self.rank : padded_length : self.world_size]

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        """The current epoch's batches from the start batch on (both read now, so that a later
        :meth:`set_epoch` does not reach a prefetching thread)."""
        start, self.start_batch = self.start_batch, 0
        return prefetched(self._batches(self.epoch, start), self.prefetch)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, ...]]:
        order = self.indices(epoch)
        for batch_index in range(start, len(self)):
            index = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            images, labels = self._batch(index, epoch, batch_index)
            yield (images, labels, index) if self.with_index else (images, labels)

    def _batch(self, index: Tensor, epoch: int, batch_index: int) -> tuple[Tensor, Tensor | None]:
        images = self._to_device(self.images[index].contiguous())
        labels = None if self.labels is None else self._to_device(self.labels[index])
        if self.augment is not None:
            generator = torch.Generator().manual_seed(
                _seed(self.seed, epoch, self.rank, batch_index, 1)
            )
            images = self.augment(images, generator)
        return normalize(images, self.mean, self.std), labels

    def _to_device(self, tensor: Tensor) -> Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


class SizeOnlyBatches:
    """The training "loader" of a data-free method: ``steps`` batches per epoch that carry only
    their size (the method makes its own images). Resumes like :class:`BatchLoader`."""

    def __init__(self, batch_size: int, steps: int) -> None:
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be >= 1, got {batch_size} and {steps}")
        self.batch_size, self.steps, self.start_batch = batch_size, steps, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.skip_batches(start_batch)

    def skip_batches(self, count: int) -> None:
        if not 0 <= count <= self.steps:
            raise ValueError(f"cannot start at batch {count}: an epoch has {self.steps} batches")
        self.start_batch = int(count)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[int]:
        """Each batch is its size."""
        start, self.start_batch = self.start_batch, 0
        for _ in range(start, self.steps):
            yield self.batch_size

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from sqakd.data import BatchAugment, BatchLoader, ImageArray


def indexed(n: int, labeled: bool = True) -> ImageArray:
    """Image i: channel c of every pixel holds i + 100 * c; label i % 3."""
    values = np.arange(n)[:, None] + 100 * np.arange(3)[None, :]
    images = np.broadcast_to(values[:, None, None, :], (n, 2, 2, 3)).astype(np.uint8)
    return ImageArray(images, np.arange(n) % 3 if labeled else None)


def ids(images: torch.Tensor) -> list[int]:
    """Recover each sample's index from channel 0 (scaled to [0, 1] by the loader)."""
    return torch.round(images[:, 0, 0, 0] * 255).long().tolist()


def epoch_ids(loader) -> list[int]:
    return [i for images, _ in loader for i in ids(images)]


def test_one_epoch_visits_every_sample_once_with_aligned_labels():
    loader = BatchLoader(indexed(10), batch_size=4, seed=1)
    assert len(loader) == 3
    seen = []
    for images, labels in loader:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (3, 2, 2)
        assert labels.tolist() == [i % 3 for i in ids(images)]
        # NHWC -> NCHW: channel c holds i + 100 c
        assert torch.allclose(images[:, 2, 1, 1] * 255, images[:, 0, 0, 0] * 255 + 200)
        seen += ids(images)
    assert sorted(seen) == list(range(10)) and seen != list(range(10))


def test_no_shuffle_and_drop_last():
    loader = BatchLoader(indexed(10), batch_size=4, shuffle=False, drop_last=True)
    assert len(loader) == 2
    assert [ids(images) for images, _ in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_mean_std_normalisation():
    loader = BatchLoader(
        indexed(4), batch_size=4, shuffle=False, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 2.0)
    )
    images, _ = next(iter(loader))
    expected = (
        torch.tensor([1.0, 101.0, 201.0]) / 255 - torch.tensor([0.0, 0.5, 1.0])
    ) / torch.tensor([1.0, 0.5, 2.0])
    assert torch.allclose(images[1, :, 0, 0], expected)


class LabelsForbidden(ImageArray):
    """A data set whose labels must not be read."""

    def __post_init__(self):
        pass

    @property
    def labels(self):
        raise AssertionError("the loader read data.labels")

    @labels.setter
    def labels(self, value):
        pass


def test_without_labels_never_touches_labels():
    data = LabelsForbidden(indexed(5, labeled=False).images)
    with pytest.raises(AssertionError):
        data.labels  # noqa: B018  (the guard works)
    loader = BatchLoader(data, batch_size=2, with_labels=False, augment=BatchAugment(pad=1))
    batches = list(loader)
    assert all(labels is None for _, labels in batches)
    assert sum(len(images) for images, _ in batches) == 5


def test_unlabeled_data_needs_with_labels_false():
    with pytest.raises(ValueError, match="with_labels=False"):
        BatchLoader(indexed(4, labeled=False), batch_size=2)


def test_order_is_a_function_of_seed_and_epoch():
    data = indexed(50)
    first, second = BatchLoader(data, 8, seed=3), BatchLoader(data, 8, seed=3)
    first.set_epoch(4)
    second.set_epoch(4)
    assert epoch_ids(first) == epoch_ids(second)
    assert epoch_ids(first) == epoch_ids(first)  # iterating again repeats the epoch
    second.set_epoch(5)
    assert epoch_ids(second) != epoch_ids(first)
    assert epoch_ids(BatchLoader(data, 8, seed=4)) != epoch_ids(BatchLoader(data, 8, seed=3))
    # (seed, epoch) = (0, 1) and (1, 0) are different streams
    a, b = BatchLoader(data, 8, seed=0), BatchLoader(data, 8, seed=1)
    a.set_epoch(1)
    assert epoch_ids(a) != epoch_ids(b)


def test_resume_mid_epoch_gives_the_same_batches():
    data = indexed(30)
    augment = BatchAugment(pad=1)
    loader = BatchLoader(data, 4, augment=augment, seed=9)
    loader.set_epoch(2)
    full = list(loader)
    resumed = BatchLoader(data, 4, augment=augment, seed=9)
    resumed.set_epoch(2, start_batch=3)
    tail = list(resumed)
    assert len(tail) == len(full) - 3
    for (images, labels), (expected_images, expected_labels) in zip(tail, full[3:], strict=True):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    resumed.skip_batches(len(resumed) - 1)
    assert len(list(resumed)) == 1
    assert len(list(resumed)) == len(resumed)  # skipping applies to one iteration only
    with pytest.raises(ValueError, match="cannot start at batch"):
        resumed.skip_batches(len(resumed) + 1)


def test_shards_are_disjoint_and_cover_the_data():
    data = indexed(12)
    shards = [BatchLoader(data, 3, seed=5, shard=(rank, 3)) for rank in range(3)]
    for shard in shards:
        shard.set_epoch(7)
    seen = [epoch_ids(shard) for shard in shards]
    assert [len(s) for s in seen] == [4, 4, 4]
    assert sorted(sum(seen, [])) == list(range(12))


def test_uneven_shards_pad_like_distributed_sampler():
    data = indexed(10)
    for rank in range(4):
        loader = BatchLoader(data, 2, shuffle=False, shard=(rank, 4))
        sampler = DistributedSampler(range(10), num_replicas=4, rank=rank, shuffle=False)
        assert loader.indices().tolist() == list(sampler)
        assert epoch_ids(loader) == list(sampler)
        assert len(loader) == 2
    everything = sum(
        (BatchLoader(data, 2, seed=1, shard=(r, 4)).indices().tolist() for r in range(4)), []
    )
    assert len(everything) == 12 and set(everything) == set(range(10))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "shard": (3, 3)}, "shard"),
        ({"batch_size": 20, "drop_last": True}, "exceeds"),
        (
            {
                "batch_size": 2,
                "augment": BatchAugment(mean=(0.5,), std=(0.5,)),
                "mean": (0.5,),
                "std": (0.5,),
            },
            "twice",
        ),
        ({"batch_size": 2, "mean": (0.5, 0.5), "std": (1, 1)}, "channels"),
    ],
)
def test_bad_settings(options, message):
    with pytest.raises(ValueError, match=message):
        BatchLoader(indexed(10), **options)

import numpy as np
import pytest

from sqakd.data import ImageArray


def indexed(n: int, labels=None, classes=None) -> ImageArray:
    """Image i has every pixel equal to i, so subsets can be traced back."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 3)).copy()
    return ImageArray(images, None if labels is None else np.asarray(labels), classes)


def test_len_classes_and_repr():
    data = indexed(6, labels=[0, 1, 2, 0, 1, 2], classes=["a", "b", "c"])
    assert len(data) == 6
    assert data.num_classes == 3
    assert data.image_shape == (2, 2, 3)
    assert data.labels.dtype == np.int64
    assert "6 images of 2x2x3" in repr(data)
    assert indexed(3, labels=[0, 4, 1]).num_classes == 5  # no names: max label + 1
    assert indexed(3).num_classes is None


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 4, 4, 3), dtype=np.float32), "uint8"),
        (np.zeros((4, 4, 3), dtype=np.uint8), "uint8"),
        (np.zeros((2, 4, 4, 2), dtype=np.uint8), "channels"),
    ],
)
def test_bad_images_are_rejected(images, message):
    with pytest.raises(ValueError, match=message):
        ImageArray(images)


def test_bad_labels_are_rejected():
    images = np.zeros((3, 2, 2, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="one label per image"):
        ImageArray(images, np.array([0, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        ImageArray(images, np.array([0, -1, 2]))


def test_subset_keeps_order_and_labels():
    data = indexed(5, labels=[0, 1, 0, 1, 0], classes=["x", "y"])
    part = data.subset([4, 1, 2])
    assert part.images[:, 0, 0, 0].tolist() == [4, 1, 2]
    assert part.labels.tolist() == [0, 1, 0]
    assert part.classes == ["x", "y"]


def test_stratified_split_takes_the_fraction_of_every_class():
    labels = [0] * 10 + [1] * 20 + [2] * 30
    data = indexed(60, labels=labels)
    kept, held = data.split(0.1, seed=3)
    assert np.bincount(held.labels).tolist() == [1, 2, 3]
    assert np.bincount(kept.labels).tolist() == [9, 18, 27]
    ids_kept, ids_held = kept.images[:, 0, 0, 0], held.images[:, 0, 0, 0]
    assert sorted(ids_kept.tolist() + ids_held.tolist()) == list(range(60))
    # image i still carries label i's class after the split
    assert (np.asarray(labels)[ids_held] == held.labels).all()


def test_split_rounds_to_exact_total_and_depends_on_seed():
    data = indexed(15, labels=[0] * 5 + [1] * 5 + [2] * 5)
    kept, held = data.split(0.5, seed=0)
    assert len(held) == round(0.5 * 15) and len(kept) == 15 - len(held)
    assert sorted(np.bincount(held.labels).tolist()) == [2, 3, 3]
    again = data.split(0.5, seed=0)[1]
    other = data.split(0.5, seed=1)[1]
    assert (again.images == held.images).all()
    assert not np.array_equal(other.images[:, 0, 0, 0], held.images[:, 0, 0, 0])


def test_unlabeled_split_sizes():
    kept, held = indexed(10).split(0.3, seed=0)
    assert (len(kept), len(held)) == (7, 3)
    assert held.labels is None


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.01])
def test_split_rejects_fractions_that_empty_a_side(fraction):
    with pytest.raises(ValueError, match="fraction"):
        indexed(10).split(fraction, seed=0)


def test_without_labels_drops_labels_and_classes():
    data = indexed(4, labels=[0, 1, 0, 1], classes=["a", "b"])
    plain = data.without_labels()
    assert plain.labels is None and plain.classes is None and plain.num_classes is None
    assert plain.images is data.images

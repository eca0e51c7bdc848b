"""The in-memory data set every reader returns: uint8 images, optional labels, class names."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class ImageArray:
    """Decoded images held as one array.

    Attributes:
        images: uint8 array of shape (N, H, W, C) with C = 1 (grey) or 3 (RGB).
        labels: int64 array of shape (N,), or ``None`` for unlabeled data.
        classes: class names, ``classes[label]`` names a label; ``None`` when unknown.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                "images must be a uint8 numpy array of shape (N, H, W, C); got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
            )
        if images.shape[3] not in (1, 3):
            raise ValueError(
                f"images must have 1 (grey) or 3 (RGB) channels last, got shape {images.shape}"
            )
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.ndim != 1 or len(labels) != len(images):
                raise ValueError(
                    f"labels must be a 1-d array with one label per image ({len(images)}), "
                    f"got shape {labels.shape}"
                )
            if len(labels) and (labels.dtype.kind not in "iu" or labels.min() < 0):
                raise ValueError("labels must be non-negative whole numbers")
            self.labels = labels.astype(np.int64, copy=False)
        if self.classes is not None:
            self.classes = [str(name) for name in self.classes]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        n, height, width, channels = self.images.shape
        kind = f"{self.num_classes} classes" if self.labels is not None else "unlabeled"
        return f"ImageArray({n} images of {height}x{width}x{channels}, {kind})"

    @property
    def num_classes(self) -> int | None:
        """``len(classes)`` when names are known, else ``max(label) + 1``; ``None`` if unlabeled."""
        if self.labels is None:
            return None
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(size) for size in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageArray:
        """The images (and labels) at ``indices``, in that order; class names are kept."""
        index = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[index]
        return ImageArray(self.images[index], labels, self.classes)

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageArray, ImageArray]:
        """Hold out ``fraction`` of the images: returns ``(kept, held_out)``.

        With labels the split is stratified: every class gives ``fraction`` of its images
        (largest-remainder rounding so the held-out part has exactly ``round(fraction * N)``).
        Both parts keep the original order; the choice depends only on ``seed``.
        """
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"split fraction must be between 0 and 1 (exclusive), got {fraction}")
        n = len(self)
        held_total = int(round(fraction * n))
        if held_total == 0 or held_total == n:
            raise ValueError(
                f"a split of {fraction} of {n} images leaves one side empty; use a fraction that "
                "keeps at least one image on each side"
            )
        rng = np.random.default_rng(seed)
        if self.labels is None:
            held = rng.permutation(n)[:held_total]
        else:
            held = _stratified_choice(self.labels, held_total, rng)
        mask = np.zeros(n, dtype=bool)
        mask[held] = True
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))

    def stratified_subset(self, count: int, seed: int = 0) -> ImageArray:
        """``count`` images, each class in proportion to its size (largest-remainder rounding),
        in their original order; the choice depends only on ``seed``. Needs labels."""
        if self.labels is None:
            raise ValueError(
                "a stratified subset needs labels and these images have none; set "
                "data.stratified_limit: false"
            )
        if count >= len(self):
            return self
        chosen = _stratified_choice(self.labels, count, np.random.default_rng(seed))
        return self.subset(np.sort(chosen))

    def with_classes(self, classes: Sequence[str], what: str = "this split") -> ImageArray:
        """The same images labelled by their class names' positions in ``classes`` (the training
        split's): a split whose folders differ (one class missing) keeps every label right.

        A class ``classes`` lacks is refused (the model has no output for it); a class missing
        here is logged as a warning. Unlabeled images and images without class names are
        returned unchanged."""
        classes = [str(name) for name in classes]
        if self.labels is None or self.classes is None or self.classes == classes:
            return self
        unknown = [name for name in self.classes if name not in classes]
        if unknown:
            raise ValueError(
                f"{what} has class(es) the training split lacks: {_listed(unknown)}; the model "
                f"knows only {_listed(classes)}; remove those folders or add them to the training split"
            )
        missing = [name for name in classes if name not in self.classes]
        if missing:
            logging.getLogger("sqakd").warning(
                "%s has no images of class(es) %s; its labels follow the training split's classes",
                what, _listed(missing),
            )  # fmt: skip
        position = {name: index for index, name in enumerate(classes)}
        table = np.array([position[name] for name in self.classes], dtype=np.int64)
        return ImageArray(self.images, table[self.labels], classes)

    def without_labels(self) -> ImageArray:
        """The same images with labels and class names dropped (for label-free training)."""
        return ImageArray(self.images)


def _listed(names: Sequence[str], shown: int = 8) -> str:
    text = ", ".join(repr(name) for name in names[:shown])
    return text + (f" ... ({len(names) - shown} more)" if len(names) > shown else "")


def _stratified_choice(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``total`` indices with each class represented in proportion to its size."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (total / len(labels))
    take = np.floor(exact).astype(np.int64)
    # Largest remainders get the leftover picks (ties broken by class order, deterministically).
    leftover = total - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:leftover]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(labels == label))[:count]
        for label, count in zip(classes, take, strict=True)
    ]
    return np.concatenate(chosen)

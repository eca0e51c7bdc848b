"""Augmentation and normalisation of whole batches (N, C, H, W), vectorised over the batch.

The standard CIFAR recipe: pad by ``pad`` zero pixels on every side, crop a random window of the
crop size (each sample its own offset), flip each sample left-right with probability 1/2, scale
uint8 to [0, 1] and normalise per channel: ``x = (pixel / 255 - mean[c]) / std[c]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .arrays import ImageArray


def to_float(images: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [0, 1] (``pixel / 255``); float input is returned as is."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images
    raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")


def _channel_vector(values: Sequence[float], channels: int, name: str, like: Tensor) -> Tensor:
    vector = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if vector.numel() == 1:
        vector = vector.expand(channels)
    if vector.numel() != channels:
        raise ValueError(
            f"{name} has {vector.numel()} values but the images have {channels} channels; "
            f"give one {name} per channel"
        )
    return vector.view(1, channels, 1, 1)


def normalize(
    images: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Tensor:
    """``(to_float(images) - mean[c]) / std[c]`` per channel c; no mean/std: only the [0, 1] scaling."""
    _check_mean_std(mean, std)
    x = to_float(images)
    if mean is None:
        return x
    channels = x.shape[1]
    return (x - _channel_vector(mean, channels, "mean", x)) / _channel_vector(
        std, channels, "std", x
    )


def _check_mean_std(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for normalisation, or neither")
    if std is not None and min(np.atleast_1d(np.asarray(std, dtype=float))) <= 0:
        raise ValueError(f"std must be positive for every channel, got {std}")


class BatchAugment:
    """Random crop with zero padding, random horizontal flip, scaling and normalisation.

    Args:
        pad: zero pixels added on each side before cropping.
        crop: (height, width) of the output; ``None`` keeps the input size.
        flip: flip each sample left-right with probability 1/2.
        mean, std: per-channel normalisation (on the [0, 1] scale); ``None`` skips it.

    Call with a batch (uint8 or float in [0, 1]) and an optional ``torch.Generator``; the same
    generator state gives the same crops and flips.
    """

    def __init__(
        self,
        pad: int = 4,
        crop: Sequence[int] | None = None,
        flip: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be a whole number >= 0, got {pad!r}")
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"crop must be (height, width) of positive sizes, got {crop!r}")
        _check_mean_std(mean, std)
        self.pad = pad
        self.crop = None if crop is None else (int(crop[0]), int(crop[1]))
        self.flip = flip
        self.mean = None if mean is None else tuple(float(v) for v in np.atleast_1d(mean))
        self.std = None if std is None else tuple(float(v) for v in np.atleast_1d(std))

    def __repr__(self) -> str:
        return (
            f"BatchAugment(pad={self.pad}, crop={self.crop}, flip={self.flip}, "
            f"mean={self.mean}, std={self.std})"
        )

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.dim() != 4:
            raise ValueError(
                f"augmentation expects a batch (N, C, H, W), got shape {tuple(images.shape)}"
            )
        cropped = self.crop_and_flip(images, generator)
        return normalize(cropped, self.mean, self.std)

    def crop_and_flip(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The geometric part alone; keeps the dtype.

        Sample n gets offsets ``(dy[n], dx[n])`` in the padded image, uniform over every window
        that fits, and output pixel ``(i, j)`` is ``padded[n, :, dy + i, dx + j]`` (with
        ``j -> crop_w - 1 - j`` when flipped).
        """
        n, channels, height, width = images.shape
        crop_h, crop_w = self.crop or (height, width)
        room_h, room_w = height + 2 * self.pad - crop_h, width + 2 * self.pad - crop_w
        if room_h < 0 or room_w < 0:
            raise ValueError(
                f"crop {crop_h}x{crop_w} is larger than the padded image "
                f"{height + 2 * self.pad}x{width + 2 * self.pad}; lower crop or raise pad"
            )
        device = generator.device if generator is not None else torch.device("cpu")
        dy = torch.randint(0, room_h + 1, (n,), generator=generator, device=device)
        dx = torch.randint(0, room_w + 1, (n,), generator=generator, device=device)
        flips = torch.rand(n, generator=generator, device=device) < 0.5
        if not self.flip:
            flips.zero_()
        rows = dy[:, None] + torch.arange(crop_h, device=device)
        steps = torch.arange(crop_w, device=device)
        steps = torch.where(flips[:, None], crop_w - 1 - steps, steps)
        cols = dx[:, None] + steps
        padded = F.pad(images, (self.pad,) * 4) if self.pad else images
        padded_w = width + 2 * self.pad
        # One gather over each padded image flattened to H*W: source = row * padded_w + col.
        source = (rows[:, :, None] * padded_w + cols[:, None, :]).reshape(n, 1, crop_h * crop_w)
        source = source.to(images.device).expand(n, channels, -1)
        flat = padded.reshape(n, channels, -1).gather(2, source)
        return flat.reshape(n, channels, crop_h, crop_w)


def channel_stats(
    data: ImageArray, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of the pixels on the [0, 1] scale.

    ``mean[c] = sum(x) / M`` and ``std[c] = sqrt(sum(x**2) / M - mean[c]**2)`` over all
    M = N * H * W pixels of channel c, computed exactly from each channel's histogram of the 256
    pixel values (counted chunk by chunk).
    """
    images = data.images
    channels = images.shape[3]
    if images.size == 0:
        raise ValueError("cannot compute channel statistics of an empty data set")
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        pixels = images[start : start + chunk].reshape(-1, channels)
        for channel in range(channels):
            counts[channel] += np.bincount(pixels[:, channel], minlength=256)
    values = np.arange(256) / 255.0
    total = counts.sum(axis=1)
    mean = (counts * values).sum(axis=1) / total
    std = np.sqrt(np.maximum((counts * values**2).sum(axis=1) / total - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)

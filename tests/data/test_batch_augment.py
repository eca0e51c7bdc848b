import numpy as np
import pytest
import torch

from sqakd.data import BatchAugment, ImageArray, channel_stats, normalize, to_float


def patterned(n: int, channels: int = 3, height: int = 6, width: int = 7) -> torch.Tensor:
    """Pixel (c, i, j) = 1 + i * width + j + 50 * c: unique and non-zero within each channel."""
    grid = 1 + torch.arange(height * width).reshape(height, width)
    image = torch.stack([grid + 50 * c for c in range(channels)])
    return image.to(torch.uint8).expand(n, -1, -1, -1).contiguous()


def reference_crop(image: torch.Tensor, pad: int, top: int, left: int, size, flip: bool):
    """Zero-pad by assignment, slice the window at (top, left), mirror it if ``flip``."""
    channels, height, width = image.shape
    padded = torch.zeros(channels, height + 2 * pad, width + 2 * pad, dtype=image.dtype)
    padded[:, pad : pad + height, pad : pad + width] = image
    window = padded[:, top : top + size[0], left : left + size[1]]
    return window.flip(-1) if flip else window


def find_transform(output, image, pad, size):
    """Every (top, left, flip) whose reference crop equals ``output``."""
    height, width = image.shape[1:]
    return [
        (top, left, flip)
        for top in range(height + 2 * pad - size[0] + 1)
        for left in range(width + 2 * pad - size[1] + 1)
        for flip in (False, True)
        if torch.equal(reference_crop(image, pad, top, left, size, flip), output)
    ]


def test_each_sample_is_the_image_shifted_by_one_offset():
    images = patterned(60)
    augment = BatchAugment(pad=2, flip=True)
    out = augment.crop_and_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    found = [find_transform(out[n], images[n], 2, (6, 7)) for n in range(len(out))]
    assert all(len(matches) == 1 for matches in found)  # unique pixels: exactly one explanation
    offsets = {matches[0][:2] for matches in found}
    flips = [matches[0][2] for matches in found]
    assert len(offsets) > 12  # samples get their own offsets (25 possible)
    assert 0 < sum(flips) < len(flips)


def test_every_offset_occurs_with_crop_smaller_than_image():
    images = patterned(400, channels=1, height=5, width=5)
    out = BatchAugment(pad=1, crop=(4, 3), flip=False).crop_and_flip(
        images, torch.Generator().manual_seed(1)
    )
    assert out.shape == (400, 1, 4, 3)
    offsets = set()
    for n in range(len(out)):
        (match,) = find_transform(out[n], images[n], 1, (4, 3))
        assert match[2] is False
        offsets.add(match[:2])
    assert offsets == {(top, left) for top in range(4) for left in range(5)}


def test_known_offset_when_only_one_fits():
    image = patterned(1, channels=1, height=2, width=3)
    out = BatchAugment(pad=1, crop=(4, 5), flip=False).crop_and_flip(image)
    expected = torch.tensor([[0, 0, 0, 0, 0], [0, 1, 2, 3, 0], [0, 4, 5, 6, 0], [0, 0, 0, 0, 0]])
    assert torch.equal(out[0, 0], expected.to(torch.uint8))


def test_flip_only_mirrors_left_right():
    images = patterned(40)
    out = BatchAugment(pad=0, flip=True).crop_and_flip(images, torch.Generator().manual_seed(3))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    unchanged = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f != u for f, u in zip(flipped, unchanged, strict=True))
    assert 0 < sum(flipped) < len(flipped)


def test_no_pad_no_flip_is_plain_scaling():
    images = patterned(3)
    out = BatchAugment(pad=0, flip=False)(images)
    assert out.dtype == torch.float32
    assert torch.equal(out, images.float() / 255)


def test_same_generator_seed_same_batch():
    images = patterned(16)
    augment = BatchAugment(pad=4)
    first = augment(images, torch.Generator().manual_seed(5))
    again = augment(images, torch.Generator().manual_seed(5))
    other = augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_normalize_values():
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3)
    out = normalize(pixels, mean=[0.5], std=[0.25])
    # (0 - 0.5) / 0.25, (1 - 0.5) / 0.25, (0.2 - 0.5) / 0.25
    assert torch.allclose(out.flatten(), torch.tensor([-2.0, 2.0, -1.2]))
    two = torch.full((1, 2, 1, 1), 102, dtype=torch.uint8)
    out = normalize(two, mean=(0.4, 0.2), std=(0.5, 0.1))
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 2.0]))
    assert torch.equal(normalize(two), two.float() / 255)
    assert torch.equal(to_float(out), out)


def test_augment_normalises_after_cropping():
    images = patterned(2)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.5, 0.25)
    out = BatchAugment(pad=0, flip=False, mean=mean, std=std)(images)
    assert torch.allclose(out, normalize(images, mean, std))
    assert torch.allclose(out[0, 2, 0, 0], torch.tensor((101 / 255 - 0.3) / 0.25))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BatchAugment(pad=-1), "pad"),
        (lambda: BatchAugment(crop=(0, 3)), "crop"),
        (lambda: BatchAugment(mean=(0.5,)), "both mean and std"),
        (lambda: BatchAugment(mean=(0.5,), std=(0.0,)), "std must be positive"),
    ],
)
def test_bad_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_inputs():
    with pytest.raises(ValueError, match="larger than the padded image"):
        BatchAugment(pad=1, crop=(9, 9))(patterned(1))
    with pytest.raises(ValueError, match="2 values but the images have 3 channels"):
        normalize(patterned(1), mean=(0.5, 0.5), std=(1, 1))
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(1, 1, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="batch"):
        BatchAugment()(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_channel_stats_by_hand():
    # channel 0: 0, 255, 0, 255 -> mean 0.5, std 0.5; channel 1 constant 51 -> 0.2, 0; channel 2: 0, 0, 0, 255
    images = np.zeros((2, 1, 2, 3), dtype=np.uint8)
    images[:, :, 1, 0] = 255
    images[..., 1] = 51
    images[1, 0, 1, 2] = 255
    mean, std = channel_stats(ImageArray(images), chunk=1)
    assert np.allclose(mean, [0.5, 0.2, 0.25])
    assert np.allclose(std, [0.5, 0.0, np.sqrt(0.25 - 0.0625)])


def test_channel_stats_match_numpy_on_random_images():
    images = np.random.default_rng(0).integers(0, 256, size=(50, 5, 4, 3), dtype=np.uint8)
    mean, std = channel_stats(ImageArray(images), chunk=7)  # chunks that do not divide N
    pixels = images.reshape(-1, 3) / 255.0
    assert np.allclose(mean, pixels.mean(axis=0), atol=1e-12)
    assert np.allclose(std, pixels.std(axis=0), atol=1e-12)

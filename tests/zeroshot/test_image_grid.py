"""A saved generator comes back from its weights alone, and the class grid lays out one row per
class of un-normalised images."""

from __future__ import annotations

import pytest
import torch

from sqakd.zeroshot import ConditionalGenerator, class_grid


def test_a_generator_is_rebuilt_from_its_weights():
    torch.manual_seed(0)
    generator = ConditionalGenerator((1, 12, 12), num_classes=4, latent_size=10, width=16)
    rebuilt = ConditionalGenerator.from_state_dict(generator.state_dict())
    assert (rebuilt.image_shape, rebuilt.num_classes, rebuilt.latent_size) == ((1, 12, 12), 4, 10)
    latent, labels = torch.randn(3, 10), torch.tensor([0, 1, 3])
    torch.testing.assert_close(rebuilt(latent, labels), generator(latent, labels))
    wide = ConditionalGenerator((3, 8, 16), num_classes=2, width=16)
    with pytest.raises(ValueError, match="not square"):
        ConditionalGenerator.from_state_dict(wide.state_dict())
    assert ConditionalGenerator.from_state_dict(wide.state_dict(), (8, 16)).image_shape == (
        3,
        8,
        16,
    )
    with pytest.raises(ValueError, match="not the weights"):
        ConditionalGenerator.from_state_dict({"x": torch.zeros(1)})


def test_the_grid_has_one_row_per_class_and_leaves_the_generator_as_it_was():
    torch.manual_seed(0)
    generator = ConditionalGenerator((3, 8, 8), num_classes=3, width=16).eval()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    grid = class_grid(generator, 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert grid.shape == (3 * 10, 4 * 10, 3) and grid.dtype == torch.uint8
    assert int(grid[8:10].min()) == 255  # the padding between rows
    assert not generator.training
    assert all(torch.equal(before[k], v) for k, v in generator.state_dict().items())
    with pytest.raises(ValueError, match="need 3 values"):
        class_grid(generator, 2, mean=(0.5,), std=(0.25,))

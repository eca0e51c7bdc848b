"""A picture of what a generator makes: one row per class, images as the teacher's input
un-normalised to [0, 255]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .generator import ConditionalGenerator


@torch.no_grad()
def class_grid(
    generator: ConditionalGenerator,
    per_class: int,
    mean: Sequence[float],
    std: Sequence[float],
    padding: int = 2,
) -> Tensor:
    """``[rows * (H + pad), per_class * (W + pad), C]`` uint8: row ``k`` holds ``per_class``
    images generated for class ``k``, times ``std`` plus ``mean``, clipped to [0, 1]. The
    generator runs as in training (its output batch norm standardises the batch); its state is
    restored afterwards."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    channels, height, width = generator.image_shape
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need {channels} values (the generator's channels), got {len(mean)} "
            f"and {len(std)}"
        )
    classes = generator.num_classes
    labels = torch.arange(classes, device=generator.device).repeat_interleave(per_class)
    saved = {k: v.clone() for k, v in generator.state_dict().items()}
    was_training = generator.training
    generator.train()
    try:
        latent = torch.randn(len(labels), generator.latent_size, device=generator.device)
        images = generator(latent, labels).cpu()
    finally:
        generator.load_state_dict(saved)
        generator.train(was_training)
    shift = torch.tensor(mean).view(1, -1, 1, 1)
    scale = torch.tensor(std).view(1, -1, 1, 1)
    pixels = ((images * scale + shift).clamp(0, 1) * 255).round().to(torch.uint8)
    cell_h, cell_w = height + padding, width + padding
    grid = torch.full((classes * cell_h, per_class * cell_w, channels), 255, dtype=torch.uint8)
    for index, image in enumerate(pixels):
        row, column = divmod(index, per_class)
        top, left = row * cell_h, column * cell_w
        grid[top : top + height, left : left + width] = image.permute(1, 2, 0)
    return grid

"""GDFQ's class-conditional generator (Xu et al. 2020; the same network in AdaDFQ and AKT).

With ``S_h x S_w`` the teacher's input size, ``C`` its channels and ``K`` its classes::

    h   = Embedding(K, 100)(y) * z             z ~ N(0, I) of size 100, y ~ Uniform{0..K-1}
    h   = Linear(100 -> 128 * S_h/4 * S_w/4)(h), reshaped to [B, 128, S_h/4, S_w/4]
    h   = BatchNorm(128)(h)
    h   = upsample x2 -> conv3x3 128->128 -> BatchNorm(eps 0.8) -> LeakyReLU(0.2)
    h   = upsample x2 -> conv3x3 128->64  -> BatchNorm(eps 0.8) -> LeakyReLU(0.2)
    h   = conv3x3 64->C -> tanh
    img = BatchNorm(C, affine=False)(h)      # output normalisation over the batch

The hidden batch norms' eps of 0.8 is the released value (a GAN example's momentum passed as the
second positional argument); kept as released. The generator always runs in training mode, so
the last batch norm standardises each channel over the batch: the images come out with zero mean
and unit variance per channel, like normalised training images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

LATENT_SIZE = 100
HIDDEN_EPS = 0.8  # as released (see the module docstring)


class ConditionalGenerator(nn.Module):
    """Images of shape ``image_shape = (C, H, W)`` for ``num_classes`` classes; ``H`` and ``W``
    must be multiples of 4 (two x2 upsamplings from a quarter-size seed)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        latent_size: int = LATENT_SIZE,
        width: int = 128,
    ) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        if height % 4 or width_px % 4 or height < 4 or width_px < 4:
            raise ValueError(
                f"the generator makes images whose sides are multiples of 4 (two x2 upsamplings); "
                f"the teacher's input is {height}x{width_px}: resize the data (data.resize) to a "
                "multiple of 4"
            )
        if num_classes < 1:
            raise ValueError("the generator needs the number of classes; set model.num_classes")
        self.image_shape = (channels, height, width_px)
        self.num_classes, self.latent_size = num_classes, latent_size
        self.seed_shape = (width, height // 4, width_px // 4)
        self.embedding = nn.Embedding(num_classes, latent_size)
        self.project = nn.Linear(latent_size, width * (height // 4) * (width_px // 4))
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width, eps=HIDDEN_EPS),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2, eps=HIDDEN_EPS),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    @property
    def device(self) -> torch.device:
        return self.project.weight.device

    def sample(self, size: int) -> tuple[Tensor, Tensor]:
        """``size`` latent vectors and uniformly drawn labels (from torch's global generator, so
        a checkpoint's random state restores them)."""
        latent = torch.randn(size, self.latent_size, device=self.device)
        labels = torch.randint(0, self.num_classes, (size,), device=self.device)
        return latent, labels

    def forward(self, latent: Tensor, labels: Tensor) -> Tensor:
        seed = self.project(self.embedding(labels) * latent)
        return self.body(seed.view(latent.shape[0], *self.seed_shape))

    def generate(self, size: int) -> tuple[Tensor, Tensor]:
        """``(images [size, C, H, W], labels [size])`` from fresh latents and labels."""
        latent, labels = self.sample(size)
        return self(latent, labels), labels

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Tensor], image_size: tuple[int, int] | None = None
    ) -> ConditionalGenerator:
        """The generator whose weights ``state`` holds (its sizes read from the weights; the
        image is square unless ``image_size`` (H, W) says otherwise)."""
        try:
            classes, latent = state["embedding.weight"].shape
            width = int(state["body.0.weight"].shape[0])
            channels = int(state["body.9.weight"].shape[0])
            cells = int(state["project.weight"].shape[0]) // width
        except KeyError as error:
            raise ValueError(f"not the weights of a ConditionalGenerator: no {error}") from None
        if image_size is None:
            side = math.isqrt(cells)
            if side * side != cells:
                raise ValueError(
                    "the generator's images are not square; give their size (data.resize)"
                )
            image_size = (4 * side, 4 * side)
        generator = cls((channels, *image_size), int(classes), int(latent), width)
        generator.load_state_dict(dict(state))
        return generator

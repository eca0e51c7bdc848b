"""ShuffleNetV2 1.0x (Ma et al. 2018) for small images.

Each unit splits its channels in two (or, when it downsamples, feeds the whole input to two
branches), passes one half through 1x1 conv -> 3x3 depthwise conv -> 1x1 conv, concatenates the
halves and shuffles the channels between the two groups::

    stride 1:  out = shuffle(cat(x_a, branch2(x_b)))         with (x_a, x_b) = split(x)
    stride 2:  out = shuffle(cat(branch1(x), branch2(x)))

Stages of 4, 8 and 4 units with 116, 232 and 464 channels, a 24-channel stem and a 1x1 head of
1024 channels. ``stem="small"`` (default) is a 3x3 stride-1 stem without max-pool for 32-64 px
inputs; ``stem="imagenet"`` is torchvision's (stride 2 + max-pool), whose names ours follow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .init import kaiming_init
from .registry import register_model

STAGE_REPEATS = (4, 8, 4)
STAGE_CHANNELS = (24, 116, 232, 464, 1024)  # stem, stage2, stage3, stage4, head (1.0x)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups: (g, c/g) -> (c/g, g)."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def _pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class ShuffleUnit(nn.Module):
    """One ShuffleNetV2 unit; ``stride=2`` halves the map and gives both branches the input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride == 1 and in_channels != out_channels:
            raise ValueError(
                "a stride-1 shuffle unit keeps its width (in_channels == out_channels)"
            )
        self.stride = stride
        half = out_channels // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(in_channels, stride),
                nn.BatchNorm2d(in_channels),
                _pointwise(in_channels, half),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            _pointwise(in_channels if stride > 1 else half, half),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            _depthwise(half, stride),
            nn.BatchNorm2d(half),
            _pointwise(half, half),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            kept, processed = x.chunk(2, dim=1)
            out = torch.cat((kept, self.branch2(processed)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """``conv1`` (stem), ``maxpool``, ``stage2``..``stage4``, ``conv5`` (head), ``fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, stem: str = "small") -> None:
        super().__init__()
        if stem not in ("small", "imagenet"):
            raise ValueError(
                f"stem must be 'small' (stride 1) or 'imagenet' (stride 2 + max-pool), got {stem!r}"
            )
        stem_width, *stage_widths, head_width = STAGE_CHANNELS
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, 2 if stem == "imagenet" else 1, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        channels = stem_width
        for index, (width, repeats) in enumerate(zip(stage_widths, STAGE_REPEATS)):
            units = [ShuffleUnit(channels, width, 2)] + [
                ShuffleUnit(width, width, 1) for _ in range(repeats - 1)
            ]
            self.add_module(f"stage{index + 2}", nn.Sequential(*units))
            channels = width
        self.conv5 = nn.Sequential(
            _pointwise(channels, head_width), nn.BatchNorm2d(head_width), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(head_width, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.fc(self.conv5(x).mean(dim=(2, 3)))


#: the three unit stages (116, 232, 464 channels at 1/2, 1/4, 1/8 of the stem's output side);
#: each ends with a channel shuffle that copies, and the 1x1 head ``conv5`` is left out
STAGE_OUTPUTS = ("stage2", "stage3", "stage4")


@register_model("shufflenetv2", stages=STAGE_OUTPUTS)
def shufflenetv2(num_classes: int = 10, in_channels: int = 3, stem: str = "small") -> ShuffleNetV2:
    """ShuffleNetV2 1.0x (stride-1 stem without max-pool for 32/64 px images by default)."""
    return ShuffleNetV2(num_classes, in_channels, stem)

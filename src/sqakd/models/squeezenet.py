"""SqueezeNet 1.1 (Iandola et al. 2016) for small images.

Fire modules squeeze the channels with a 1x1 convolution and expand them again with parallel 1x1
and 3x3 convolutions whose outputs are concatenated::

    s = relu(squeeze(x));  out = cat(relu(expand1x1(s)), relu(expand3x3(s)))

Layout (1.1): conv 64 -> max-pool -> fire(16, 64) x2 -> max-pool -> fire(32, 128) x2 -> max-pool
-> fire(48, 192) x2 -> fire(64, 256) x2 -> dropout -> 1x1 conv to the classes -> ReLU -> global
average pooling. No batch norm; the classifier is a convolution. ``stem="small"`` (default) makes
the first convolution 3x3 with stride 1 and padding 1 for 32-64 px inputs; ``stem="imagenet"``
is torchvision's (stride 2, no padding), whose names ours follow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_model

#: (squeeze, expand per branch) of the eight fire modules; "M" is a 3x3 stride-2 max-pool
FIRE_LAYOUT: list[tuple[int, int] | str] = [
    "M",
    (16, 64),
    (16, 64),
    "M",
    (32, 128),
    (32, 128),
    "M",
    (48, 192),
    (48, 192),
    (64, 256),
    (64, 256),
]


class Fire(nn.Module):
    """Squeeze (1x1) then expand with concatenated 1x1 and 3x3 convolutions."""

    def __init__(self, in_channels: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            (
                self.expand1x1_activation(self.expand1x1(x)),
                self.expand3x3_activation(self.expand3x3(x)),
            ),
            1,
        )


class SqueezeNet(nn.Module):
    """``features`` (stem conv, pools, fire modules) and ``classifier`` (1x1 conv, pooling)."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, stem: str = "small", dropout: float = 0.5
    ) -> None:
        super().__init__()
        if stem == "small":
            layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, stride=1, padding=1)]
        elif stem == "imagenet":
            layers = [nn.Conv2d(in_channels, 64, 3, stride=2)]
        else:
            raise ValueError(
                f"stem must be 'small' (stride 1) or 'imagenet' (stride 2), got {stem!r}"
            )
        layers.append(nn.ReLU(inplace=True))
        channels = 64
        for item in FIRE_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(3, stride=2, ceil_mode=True))
            else:
                squeeze, expand = item
                layers.append(Fire(channels, squeeze, expand))
                channels = 2 * expand
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Conv2d(channels, num_classes, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-uniform convolutions, ``N(0, 0.01)`` for the classifier, zero biases."""
        final = self.classifier[1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if module is final:
                    nn.init.normal_(module.weight, 0.0, 0.01)
                else:
                    nn.init.kaiming_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x)).flatten(1)


#: the last fire module before each max-pool and the last one (128, 256, 512 channels at 1/2,
#: 1/4, 1/8 of the stem's output side); a fire module's output is a fresh concatenation
STAGE_OUTPUTS = ("features.4", "features.7", "features.12")


@register_model("squeezenet", stages=STAGE_OUTPUTS)
def squeezenet(
    num_classes: int = 10, in_channels: int = 3, stem: str = "small", dropout: float = 0.5
) -> SqueezeNet:
    """SqueezeNet 1.1 (stride-1 stem for 32/64 px images by default)."""
    return SqueezeNet(num_classes, in_channels, stem, dropout)

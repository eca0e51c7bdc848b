"""VGG with batch norm for small images: VGG-8 (the EWGS/SQAKD CIFAR network), VGG-11, VGG-13.

Five stages of 3x3 convolutions (conv -> BN -> ReLU), then global average pooling and one linear
layer (512 -> classes), as in the released SQAKD CIFAR code. Stage widths per network:

    vgg8:  [64], [128], [256], [512], [512]                          (5 conv + 1 linear)
    vgg11: [64], [128], [256, 256], [512, 512], [512, 512]
    vgg13: [64, 64], [128, 128], [256, 256], [512, 512], [512, 512]

A 2x2 max-pool follows stages 0, 1 and 2; after stage 3 the map is pooled only while it is
larger than 4x4 (a 32 px input reaches stage 4 at 4x4, a 64 px input is pooled from 8x8 to 4x4),
which is what that code does for 32 and 64 px inputs. Parameter names follow it too
(``layer0.0.conv2d.weight``, ``layer0.0.bn.*``, ``classifier.*``), so its float checkpoints load.
"""

from __future__ import annotations

from torch import Tensor, nn

from .init import kaiming_init
from .registry import register_model

STAGES: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}

#: stage 3's output is max-pooled only while its side is larger than this
SMALLEST_POOLED_SIDE = 4


class VGGBlock(nn.Module):
    """relu(bn(conv2d(x))) with a 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv2d(x)))


class VGG(nn.Module):
    """Five VGG stages (``layer0`` .. ``layer4``), global average pooling, ``classifier``."""

    def __init__(
        self, stages: list[list[int]], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if len(stages) != 5:
            raise ValueError(f"VGG needs 5 stages of channel widths, got {len(stages)}")
        for index, widths in enumerate(stages):
            blocks = []
            for width in widths:
                blocks.append(VGGBlock(in_channels, width))
                in_channels = width
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        kaiming_init(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.layer0(x))
        x = self.pool(self.layer1(x))
        x = self.pool(self.layer2(x))
        x = self.layer3(x)
        if x.shape[-1] > SMALLEST_POOLED_SIDE:
            x = self.pool(x)
        x = self.layer4(x)
        return self.classifier(self.avgpool(x).flatten(1))


#: the five stages' outputs, before their max-pool (timm's VGG features are pre-pool too); at
#: 32 px, layer3 and layer4 both give 4x4 maps
STAGE_OUTPUTS = ("layer0", "layer1", "layer2", "layer3", "layer4")


def _register(name: str) -> None:
    @register_model(name, stages=STAGE_OUTPUTS)
    def build(num_classes: int = 10, in_channels: int = 3) -> VGG:
        return VGG(STAGES[name], num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name.upper()} with batch norm for 32/64 px inputs (stages {STAGES[name]})."


for _name in STAGES:
    _register(_name)

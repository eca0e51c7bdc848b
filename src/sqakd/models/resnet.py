"""ResNet-18 and ResNet-34 (He et al. 2016) for 64x64 images (Tiny-ImageNet).

Four stages of basic blocks (64, 128, 256, 512 channels; 2-2-2-2 or 3-4-6-3 blocks), the last
three starting with stride 2 and a 1x1 conv + BN projection shortcut (option B), then global
average pooling and ``fc``. Parameter names are torchvision's.

The stem decides the resolution the stages see:

- ``stem="small"`` (default): 3x3 conv, stride 1, no max-pool. A 64 px image reaches the
  stages at 64x64 and the last stage at 8x8 (the usual choice for 64 px training).
- ``stem="imagenet"``: 7x7 conv, stride 2, then a 3x3 stride-2 max-pool (torchvision's
  network: its checkpoints load as they are). This is what the released SQAKD Tiny-ImageNet
  code builds, but it feeds it images resized to 224 px.
"""

from __future__ import annotations

from torch import Tensor, nn

from .init import kaiming_init
from .registry import register_model


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x)), two 3x3 convolutions."""

    #: the submodule whose output is the residual body's, before the shortcut is added
    body_output = "bn2"

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem (``conv1``, ``bn1``, optional ``maxpool``), ``layer1``..``layer4``, ``fc``."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "small",
    ) -> None:
        super().__init__()
        if stem == "small":
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            raise ValueError(
                f"stem must be 'small' (3x3, stride 1) or 'imagenet' (7x7 + max-pool), got {stem!r}"
            )
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        widths = (64, 128, 256, 512)
        channels = 64
        for index, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(channels, width, stride)] + [
                BasicBlock(width, width) for _ in range(count - 1)
            ]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


#: block-stage outputs (64, 128, 256, 512 channels at 1, 1/2, 1/4, 1/8 of the stem's output side)
STAGE_OUTPUTS = ("layer1", "layer2", "layer3", "layer4")


@register_model("resnet18", stages=STAGE_OUTPUTS)
def resnet18(num_classes: int = 10, in_channels: int = 3, stem: str = "small") -> ResNet:
    """ResNet-18 (2-2-2-2 basic blocks), 3x3 stride-1 stem for 64 px images by default."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, stem)


@register_model("resnet34", stages=STAGE_OUTPUTS)
def resnet34(num_classes: int = 10, in_channels: int = 3, stem: str = "small") -> ResNet:
    """ResNet-34 (3-4-6-3 basic blocks), 3x3 stride-1 stem for 64 px images by default."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, stem)

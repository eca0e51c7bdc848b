"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56/110.

A 3x3 stem with 16 channels, then three stages of ``n`` basic blocks with 16, 32 and 64 channels
(depth = 6n + 2); the first block of stages 2 and 3 halves the feature map with stride 2. The
shortcut is the paper's option A, which has no parameters::

    shortcut(x) = zero_pad_channels(x[:, :, ::2, ::2])      # when the shape changes
    shortcut(x) = x                                        # otherwise

followed by global average pooling and one linear layer. ResNet-20 has 0.27M parameters,
ResNet-56 0.85M. (The released EWGS/SQAKD CIFAR code adds a BatchNorm1d before the classifier;
this is the paper's network.)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .init import kaiming_init
from .registry import register_model


class ChannelPadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channels to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), two 3x3 convolutions."""

    #: the submodule whose output is the residual body's, before the shortcut is added
    body_output = "bn2"

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = ChannelPadShortcut(in_channels, channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: stem, three stages (16, 32, 64 channels), pool, fc."""

    #: the classifier's name in widely used public CIFAR ResNet code, renamed on loading
    checkpoint_key_map = {"linear.": "fc."}

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}"
            )
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, channels, stride)]
        layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


#: block-stage outputs (16, 32, 64 channels at 1, 1/2, 1/4 of the input side); each stage ends
#: with a ReLU on a fresh sum, and the next stage only reads it
STAGE_OUTPUTS = ("layer1", "layer2", "layer3")


def _register(depth: int) -> None:
    @register_model(f"resnet{depth}", stages=STAGE_OUTPUTS)
    def build(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)."


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)

"""A small CNN for 28x28 grey images (Fashion-MNIST): quick to train on a CPU.

Three 3x3 conv -> BN -> ReLU blocks with 32, 64 and 128 channels, a 2x2 max-pool after the first
two (28 -> 14 -> 7), global average pooling and one linear layer: about 94k parameters. Each
block has its own ReLU module (``relu1`` .. ``relu3``), whose output is the block's feature map:
a forward hook on a module the forward calls once sees one tensor per call.
"""

from __future__ import annotations

from torch import Tensor, nn

from .init import kaiming_init
from .registry import register_model


class SmallCNN(nn.Module):
    """conv1/bn1/relu1 -> pool -> conv2/bn2/relu2 -> pool -> conv3/bn3/relu3 -> global pool -> fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.relu3 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.avgpool(x).flatten(1))


#: each block's ReLU output, before its max-pool (32, 64, 128 channels at 28, 14, 7 px for a
#: 28 px image)
STAGE_OUTPUTS = ("relu1", "relu2", "relu3")


@register_model("small_cnn", stages=STAGE_OUTPUTS)
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> SmallCNN:
    """Three-conv CNN for 28x28 grey images (``width`` channels in the first layer)."""
    return SmallCNN(num_classes, in_channels, width)

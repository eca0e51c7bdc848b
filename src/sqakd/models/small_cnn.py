"""A small CNN for 28x28 grey images (Fashion-MNIST): quick to train on a CPU.

Three 3x3 conv -> BN -> ReLU blocks with 32, 64 and 128 channels, a 2x2 max-pool after the first
two (28 -> 14 -> 7), global average pooling and one linear layer: about 94k parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from .init import kaiming_init
from .registry import register_model


class SmallCNN(nn.Module):
    """conv1/bn1 -> pool -> conv2/bn2 -> pool -> conv3/bn3 -> global pool -> fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> SmallCNN:
    """Three-conv CNN for 28x28 grey images (``width`` channels in the first layer)."""
    return SmallCNN(num_classes, in_channels, width)

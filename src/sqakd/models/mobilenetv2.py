"""MobileNetV2 (Sandler et al. 2018): inverted residuals with depthwise convolutions.

Each block expands the channels by ``t`` with a 1x1 convolution, filters them with a 3x3
depthwise convolution (``groups = channels``), and projects back with a linear 1x1 convolution;
when stride is 1 and the widths match, the input is added back::

    out = x + bn(pw_linear(relu6(bn(dw3x3(relu6(bn(pw_expand(x))))))))

Stages (t, channels, repeats, stride): (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
(6,160,3,2) (6,320,1,1), between a 3x3 stem of 32 channels and a 1x1 head of 1280, then global
pooling and dropout + linear. ``width_mult`` scales every width (rounded to multiples of 8).
For 32-64 px inputs the stem has stride 1 (``stem_stride=2`` gives the ImageNet network, whose
parameter names match torchvision's ``mobilenet_v2``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .init import kaiming_init
from .registry import register_model

#: (expansion t, output channels c, repeats n, stride of the first block s)
STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below 90% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU(nn.Sequential):
    """conv (k x k, 'same' padding) -> BN -> ReLU6."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), with a skip when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    @property
    def body_output(self) -> str:
        """The projection's batch norm: the body's output, before the skip is added."""
        return f"conv.{len(self.conv) - 1}"

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """``features`` (stem, 17 inverted residuals, 1x1 head), global pooling, ``classifier``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        stem_stride: int = 1,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if stem_stride not in (1, 2):
            raise ValueError(
                f"stem_stride must be 1 (small images) or 2 (ImageNet), got {stem_stride}"
            )
        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(in_channels, channels, stride=stem_stride)]
        for expansion, width, repeats, stride in STAGES:
            out_channels = make_divisible(width * width_mult)
            for index in range(repeats):
                features.append(
                    InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion)
                )
                channels = out_channels
        features.append(ConvBNReLU(channels, last_channels, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        kaiming_init(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


#: the last inverted residual of each resolution (16, 24, 32, 96, 320 channels at 1, 1/2, 1/4,
#: 1/8, 1/16 of the stem's output side), as timm's feature_info; the 1x1 head is left out
STAGE_OUTPUTS = ("features.1", "features.3", "features.6", "features.13", "features.17")


@register_model("mobilenetv2", stages=STAGE_OUTPUTS)
def mobilenetv2(
    num_classes: int = 10,
    in_channels: int = 3,
    width_mult: float = 1.0,
    stem_stride: int = 1,
    dropout: float = 0.2,
) -> MobileNetV2:
    """MobileNetV2 (stride-1 stem for 32/64 px images by default)."""
    return MobileNetV2(num_classes, in_channels, width_mult, stem_stride, dropout)

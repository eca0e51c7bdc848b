"""Models and quantization settings shared by the export tests (imported by name: this folder
is on sys.path while its tests run)."""

from __future__ import annotations

import torch
from torch import nn

from sqakd.quant import QuantPolicy, available_quantizers, calibrate, prepare

#: quantizers that only exist for weights -> (weight method, activation method, W bits, A bits)
WEIGHT_ONLY = {
    "binary": ("binary", "lsq", 1, 4),
    "ternary": ("ternary", "lsq", 2, 4),
    "faqd4": ("faqd4", "lsq", 4, 4),
}


def bit_settings(method: str) -> list[tuple[int, int]]:
    """W8A8 and W4A4, or the fixed bit-width of a weight-only method."""
    if method in WEIGHT_ONLY:
        return [WEIGHT_ONLY[method][2:]]
    return [(8, 8), (4, 4)]


#: (method, weight bits, activation bits) for every registered quantizer
CASES = [(m, w, a) for m in available_quantizers() for w, a in bit_settings(m)]


class SmallNet(nn.Module):
    """Conv-BN-ReLU, a strided depthwise conv, a pointwise conv with bias, and a linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.pointwise = nn.Sequential(
            nn.Conv2d(16, 32, 1, bias=True), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def train_briefly(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> dict[str, torch.Tensor]:
    """A few full-batch Adam steps on the real images, so that predictions are varied and
    input-dependent (agreement between two runtimes is then a real test). Returns the state."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def quantize(
    model: nn.Module, images: torch.Tensor, method: str, weight_bits: int, act_bits: int, **policy
) -> nn.Module:
    """``model`` prepared with ``method`` (weight-only methods get LSQ activations) and
    calibrated on the first 128 of ``images``; eval mode."""
    weight_method, act_method = WEIGHT_ONLY.get(method, (method, method))[:2]
    prepared = prepare(
        model,
        QuantPolicy(
            method=weight_method,
            act_method=act_method,
            weight_bits=weight_bits,
            act_bits=act_bits,
            **policy,
        ),
    )
    calibrate(prepared, [images[:128]])
    return prepared.eval()


def fit_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every batch norm's running statistics to those of ``images`` (one forward in training
    mode with a cumulative average), then switch to eval mode. On a quantized model this is the
    batch-norm re-estimation that QAT begins with."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()

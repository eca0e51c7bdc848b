"""Images/s of a ResNet-20 training step (forward + backward + optimizer) at batch 128 on this
machine: float, and W4A4 with each registered quantizer; the ratio is float time / quantized time
cost (1.30 = the quantized step takes 1.3x as long). Run: python benchmarks/quantizer_overhead.py"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _timing import images_per_second, machine

from sqakd.models import build_model
from sqakd.quant import QuantPolicy, available_quantizers, calibrate, prepare

ONE_ROLE = {"binary": ("binary", 1, 4), "ternary": ("ternary", 2, 4)}  # weight-only methods


def training_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    model = build_model("resnet20", num_classes=10)
    float_rate = images_per_second(
        training_step(model, images, labels), args.batch_size, repeats=args.repeats
    )
    print(f"ResNet-20, batch {args.batch_size}, training step; machine: {machine()}\n")
    print("| method | W/A bits | images/s | time vs float |")
    print("|---|---|---|---|")
    print(f"| float | 32/32 | {float_rate:.0f} | 1.00x |")
    for method in args.methods or available_quantizers():
        weight_method, weight_bits, act_bits = ONE_ROLE.get(method, (method, 4, 4))
        act_method = "lsq" if method in ONE_ROLE else method
        policy = QuantPolicy(
            method=method,
            weight_method=weight_method,
            act_method=act_method,
            weight_bits=weight_bits,
            act_bits=act_bits,
        )
        student = prepare(model, policy)
        calibrate(student, [images])
        rate = images_per_second(
            training_step(student, images, labels), args.batch_size, repeats=args.repeats
        )
        label = f"{method} (A: lsq)" if method in ONE_ROLE else method
        print(f"| {label} | {weight_bits}/{act_bits} | {rate:.0f} | {float_rate / rate:.2f}x |")


if __name__ == "__main__":
    main()

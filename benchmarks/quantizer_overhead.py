"""Images/s of a ResNet-20 training step (forward + backward + optimizer) at batch 128 on this
machine: float, and W4A4 with each registered quantizer; the ratio is quantized time / float
time (1.30 = the quantized step takes 1.3x as long). Each quantizer is timed in interleaved
rounds against its own float step (median of the rounds), so a busy machine disturbs both alike.
Run: python benchmarks/quantizer_overhead.py [--rounds 5] [--methods lsq pact]"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _timing import add_kernels_option, compiled_kernels, interleaved_medians, machine

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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    add_kernels_option(parser)
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = compiled_kernels(args.kernels)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    model = build_model("resnet20", num_classes=10)
    float_step = training_step(model, images, labels)
    print(
        f"ResNet-20, batch {args.batch_size}, training step"
        f", {'compiled' if compiled else 'eager'} quantizer kernels; machine: {machine()}; median of "
        f"{args.rounds} rounds, each quantizer interleaved with the float step\n"
    )
    print("| method | W/A bits | float images/s | images/s | time vs float |")
    print("|---|---|---|---|---|")
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
        student = prepare(model, policy, compiled_kernels=compiled)
        calibrate(student, [images])
        seconds = interleaved_medians(
            {"float": float_step, "quantized": training_step(student, images, labels)},
            args.rounds,
        )
        label = f"{method} (A: lsq)" if method in ONE_ROLE else method
        print(
            f"| {label} | {weight_bits}/{act_bits} | {args.batch_size / seconds['float']:.0f} "
            f"| {args.batch_size / seconds['quantized']:.0f} "
            f"| {seconds['quantized'] / seconds['float']:.2f}x |"
        )


if __name__ == "__main__":
    main()

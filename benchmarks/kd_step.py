"""Images/s of an SQAKD W4A4 training step (teacher forward without autograd + quantized student
forward/backward + two Adam optimizers) against a plain float training step, for ResNet-20 on
CIFAR-sized inputs. Run: python benchmarks/kd_step.py [--batch-sizes 128 256]"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _timing import images_per_second, machine

from sqakd.config import MethodConfig
from sqakd.methods import build_method
from sqakd.models import build_model
from sqakd.quant import QuantPolicy, calibrate, model_parameters, prepare, quantizer_parameters


def float_step(model, images, labels):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def sqakd_step(teacher, student, images):
    method = build_method(MethodConfig(name="sqakd"))
    optimizers = [
        torch.optim.Adam(model_parameters(student), lr=1e-3),
        torch.optim.Adam(quantizer_parameters(student), lr=1e-5),
    ]

    def step() -> None:
        output = method.training_step(student, teacher, images, None)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        output.total.backward()
        for optimizer in optimizers:
            optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--method", default="ewgs")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"ResNet-20, SQAKD W4A4 ({args.method}) vs float training step; machine: {machine()}\n")
    print("| batch | float images/s | SQAKD images/s | SQAKD time vs float |")
    print("|---|---|---|---|")
    for batch_size in args.batch_sizes:
        images = torch.randn(batch_size, 3, 32, 32)
        labels = torch.randint(0, 10, (batch_size,))
        teacher = build_model("resnet20", num_classes=10).eval()
        plain = copy.deepcopy(teacher).train()
        float_rate = images_per_second(
            float_step(plain, images, labels), batch_size, repeats=args.repeats
        )
        student = prepare(
            teacher, QuantPolicy(method=args.method, weight_bits=4, act_bits=4)
        ).train()
        calibrate(student, [images])
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        kd_rate = images_per_second(
            sqakd_step(teacher, student, images), batch_size, repeats=args.repeats
        )
        print(f"| {batch_size} | {float_rate:.0f} | {kd_rate:.0f} | {float_rate / kd_rate:.2f}x |")


if __name__ == "__main__":
    main()

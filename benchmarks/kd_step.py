"""Time of an SQAKD W4A4 training step (teacher forward without autograd + quantized student
forward/backward + two Adam optimizers) against a plain float training step, for ResNet-20 on
CIFAR-sized inputs, plus the parts: the teacher's forward alone and the SQAKD step with
quantization switched off (float student + teacher), so the quantizers' own cost is visible.

The variants are timed in interleaved rounds (each round times every variant) and each number is
the median over rounds, so that a machine shared with other jobs disturbs all of them alike.

Run: python benchmarks/kd_step.py [--batch-sizes 128 256] [--threads 2] [--rounds 5] [--kernels auto|eager|compiled]
[--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import add_kernels_option, compiled_kernels, interleaved_medians, machine

from sqakd.config import MethodConfig, TrainConfig
from sqakd.engine import RunLog, Trainer
from sqakd.engine.inference import frozen_for_inference
from sqakd.methods import Batch, build_method
from sqakd.models import build_model
from sqakd.quant import (
    QuantPolicy,
    calibrate,
    prepare,
    set_quantization,
)


def float_step(model, images, labels) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def sqakd_step(teacher, student, images, quantized: bool = True) -> Callable[[], None]:
    """One batch through the real trainer: SQAKD's losses, then its update (zero-grad, finite
    check, backward, two Adam optimizers and their schedules)."""
    trainer = Trainer(student, teacher, build_method(MethodConfig(name="sqakd")), [None],
                      TrainConfig(epochs=1), torch.device("cpu"), RunLog(Path("."), enabled=False),
                      progress=False)  # fmt: skip
    batch = Batch(images, size=images.shape[0])

    def step() -> None:
        set_quantization(student, quantized)
        trainer.train_step(batch)
        set_quantization(student, True)

    return step


def teacher_forward(teacher, images) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            teacher(images)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--method", default="ewgs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--channels-last", action="store_true", help="models and input in channels-last layout"
    )
    add_kernels_option(parser)
    parser.add_argument(
        "--unfused-teacher",
        action="store_true",
        help="teacher with its batch norm layers (before the pipeline folded them)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine; with "
        "--threads 1 it is the step's own work)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = compiled_kernels(args.kernels)
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    print(
        f"ResNet-20, SQAKD W4A4 ({args.method}) vs float training step"
        f"{', channels-last' if args.channels_last else ''}"
        f", {'compiled' if compiled else 'eager'} quantizer kernels"
        f"{', unfused teacher' if args.unfused_teacher else ''}; machine: {machine()}; "
        f"{args.clock} time, median of {args.rounds} interleaved rounds\n"
    )
    print(
        "| batch | float step ms | teacher fwd | SQAKD, quantizers off | SQAKD step ms | "
        "SQAKD vs float | SQAKD images/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        images = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=layout)
        labels = torch.randint(0, 10, (batch_size,))
        teacher = build_model("resnet20", num_classes=10).eval().to(memory_format=layout)
        plain = copy.deepcopy(teacher).train()
        student = prepare(
            copy.deepcopy(teacher),
            QuantPolicy(method=args.method, weight_bits=4, act_bits=4),
            compiled_kernels=compiled,
        ).train()
        calibrate(student, [images])
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        if not args.unfused_teacher:  # what the pipeline runs: batch norm folded
            teacher = frozen_for_inference(teacher)
        seconds = interleaved_medians(
            {
                "float": float_step(plain, images, labels),
                "teacher": teacher_forward(teacher, images),
                "off": sqakd_step(teacher, student, images, quantized=False),
                "sqakd": sqakd_step(teacher, student, images),
            },
            args.rounds,
            clock=time.process_time if args.clock == "cpu" else time.perf_counter,
        )
        base = seconds["float"]
        print(
            f"| {batch_size} | {base * 1e3:.0f} | {seconds['teacher'] / base:.2f}x "
            f"| {seconds['off'] / base:.2f}x | {seconds['sqakd'] * 1e3:.0f} "
            f"| {seconds['sqakd'] / base:.2f}x | {batch_size / seconds['sqakd']:.0f} |"
        )


if __name__ == "__main__":
    main()

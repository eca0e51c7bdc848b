"""Mixed precision (``run.precision``) for SQAKD W4A4 EWGS on ResNet-20: the step time of a
float training step, of the SQAKD step in float32, with only the frozen teacher in bfloat16, and
with the teacher and the student in bfloat16 (``run.precision: bf16``), each with its ratio to
the float step; then the test top-1 each reaches after the same short run on real CIFAR-10
images from the shared trained teacher.

The variants are timed side by side in one process, in interleaved rounds (each round times
every variant; each number is the median over rounds), so that a machine shared with other jobs
disturbs all of them alike. Every variant runs through the real trainer (the float step:
labeled training of the float network, ``method: supervised``). In every variant the quantizers
round in float32, and evaluation is float32 (``docs/quantizers.md``, "Mixed precision").

Run (about 10 minutes on 2 cores with the defaults; --quick for a smoke test of a minute):
    python benchmarks/precision_step.py [--batch-sizes 128 256] [--rounds 5] [--steps 100]
        [--train-images 5000] [--test-images 2000] [--data DIR] [--teacher FILE]
        [--kernels auto|eager|compiled] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _timing import add_kernels_option, compiled_kernels, interleaved_medians, machine
from torch import Tensor, nn

from sqakd.config import MethodConfig, TrainConfig
from sqakd.data import BatchAugment, BatchLoader, ImageArray, decode_images, list_images
from sqakd.engine import RunLog, Trainer, evaluate, teacher_for
from sqakd.methods import Batch, build_method
from sqakd.models import build_model, load_weights
from sqakd.quant import QuantPolicy, calibrate, prepare

WORK = Path(__file__).resolve().parents[2]
#: the shared teacher and the normalisation it was trained with (shared/teachers/README.md)
TEACHER = WORK / "shared" / "teachers" / "resnet20-cifar10jpeg-e30.safetensors"
MEAN = (0.49125038411458327, 0.482090271216299, 0.4465209360447303)
STD = (0.24523160744670275, 0.24278155024374343, 0.26062876810583296)

#: (row label, method, where bfloat16 autocast acts: "none", "teacher" or "step")
VARIANTS = (
    ("float step (CE, float32)", "supervised", "none"),
    ("SQAKD, float32", "sqakd", "none"),
    ("SQAKD, bf16 teacher", "sqakd", "teacher"),
    ("SQAKD, bf16 teacher + student", "sqakd", "step"),
)


class AutocastTeacher(nn.Module):
    """A frozen teacher whose forward runs under bfloat16 autocast and returns float32 logits:
    the "bf16 teacher only" variant (``run.precision: bf16`` puts the whole step under autocast)."""

    def __init__(self, teacher: nn.Module, device_type: str) -> None:
        super().__init__()
        self.teacher, self.device_type = teacher, device_type
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.teacher(images).float()


def real_images(root: Path, split: str, count: int) -> ImageArray:
    """The first ``count / 10`` images of every class of ``root/split`` (sorted names)."""
    folder = root / split
    if not folder.is_dir():
        raise SystemExit(f"no {split}/ folder in {root}; give --data (CIFAR-10 JPEG class folders)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    per_class = max(1, count // len(classes))
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = list_images(folder / name)[:per_class]
        paths += [str(folder / name / path) for path in found]
        labels += [label] * len(found)
    return ImageArray(decode_images(paths), np.asarray(labels, dtype=np.int64), classes)


def student_of(teacher: nn.Module, compiled: bool) -> nn.Module:
    policy = QuantPolicy(method="ewgs", weight_bits=4, act_bits=4)
    student = prepare(copy.deepcopy(teacher), policy, compiled_kernels=compiled)
    student.requires_grad_(True)
    return student.train()


def build_trainer(
    teacher: nn.Module,
    method: str,
    autocast: str,
    loader: BatchLoader,
    steps: int,
    compiled: bool,
    log: RunLog,
    eval_loader: BatchLoader | None = None,
) -> Trainer:
    """The real trainer for one variant: its own student (a copy of the teacher, quantized and
    calibrated on the loader's first batch for SQAKD), one epoch of ``steps`` steps."""
    if method == "supervised":
        student, frozen = copy.deepcopy(teacher).train().requires_grad_(True), None
    else:
        student = student_of(teacher, compiled)
        loader.set_epoch(0)
        calibrate(student, [next(iter(loader))[0]])
        frozen = teacher_for("logits", teacher)
        if autocast == "teacher":
            frozen = AutocastTeacher(frozen, "cpu")
    config = TrainConfig(epochs=1, max_steps_per_epoch=steps)
    return Trainer(student, frozen, build_method(MethodConfig(name=method)), loader, config,
                   torch.device("cpu"), log, eval_loader=eval_loader,
                   progress=False, precision="bf16" if autocast == "step" else "float32")  # fmt: skip


def timed_step(trainer: Trainer, images: Tensor, labels: Tensor) -> Callable[[], None]:
    batch = Batch(images, labels, size=int(images.shape[0]))
    return lambda: trainer.train_step(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=100, help="training steps before top-1")
    parser.add_argument("--accuracy-batch", type=int, default=128, help="batch of the short run")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=None, help="CIFAR-10 JPEG class folders")
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes")
    add_kernels_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.rounds, args.steps, args.accuracy_batch = [16], 1, 3, 16
        args.train_images, args.test_images = 200, 100
    if args.threads:
        torch.set_num_threads(args.threads)
    log = RunLog(Path("."), enabled=False)  # one quiet log for every trainer: the table only
    log.logger.setLevel(logging.WARNING)
    data = args.data or Path(os.environ.get("SQAKD_CIFAR10_ROOT") or WORK / "data" / "cifar10")
    if not args.teacher.is_file():
        raise SystemExit(f"teacher {args.teacher} not found; give --teacher (a ResNet-20)")
    compiled = compiled_kernels(args.kernels)
    teacher = load_weights(build_model("resnet20", num_classes=10), args.teacher).eval()
    train, test = real_images(data, "train", args.train_images), real_images(data, "test", args.test_images)  # fmt: skip
    augment = BatchAugment(pad=4, flip=True, mean=MEAN, std=STD)

    def train_loader(batch_size: int) -> BatchLoader:
        return BatchLoader(train, batch_size, augment=augment, drop_last=True, seed=0, prefetch=1)

    test_loader = BatchLoader(test, 256, shuffle=False, mean=MEAN, std=STD)
    print(
        f"ResNet-20, SQAKD W4A4 EWGS, {'compiled' if compiled else 'eager'} quantizer kernels; "
        f"machine: {machine()}; wall time, median of {args.rounds} interleaved rounds; top-1 on "
        f"{len(test)} test images after {args.steps} steps (batch {args.accuracy_batch}) on "
        f"{len(train)} training images from {args.teacher.name} (its own top-1: "
        f"{evaluate(teacher, test_loader, torch.device('cpu'))['top1']:.2f} %)\n"
    )
    print("| batch | variant | step ms | vs float step | top-1 % |")
    print("|---|---|---|---|---|")
    top1: dict[str, float] = {}
    for label, method, autocast in VARIANTS:  # the short runs: once, at the accuracy batch
        torch.manual_seed(0)
        trainer = build_trainer(teacher, method, autocast, train_loader(args.accuracy_batch),
                                args.steps, compiled, log, test_loader)  # fmt: skip
        top1[label] = trainer.fit().last["top1"]
    for batch_size in args.batch_sizes:
        loader = train_loader(batch_size)
        loader.set_epoch(0)
        images, labels = next(iter(loader))
        steps = {
            label: timed_step(
                build_trainer(teacher, method, autocast, loader, 10**6, compiled, log),
                images,
                labels,
            )
            for label, method, autocast in VARIANTS
        }
        seconds = interleaved_medians(steps, args.rounds, clock=time.perf_counter)
        base = seconds[VARIANTS[0][0]]
        for label, _, _ in VARIANTS:
            print(
                f"| {batch_size} | {label} | {seconds[label] * 1e3:.0f} "
                f"| {seconds[label] / base:.2f}x | {top1[label]:.2f} |"
            )


if __name__ == "__main__":
    main()

"""Training throughput of SQAKD W4A4 (ResNet-20, EWGS, global batch 128, CIFAR-sized synthetic
images, the real Trainer + BatchLoader with augmentation) in one process with T threads against
N processes with T/N threads each under torchrun (gloo).

Each configuration runs ``--repeats`` times; each run does warm-up steps, then times one epoch of
``--steps`` steps; the table gives the median images/s over runs (the machine may be shared).

Run: python benchmarks/ddp_throughput.py [--cores 2] [--steps 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(args: argparse.Namespace) -> None:
    """One rank: train ``steps`` steps after a warm-up; rank 0 prints a JSON line."""
    import copy

    import numpy as np
    import torch

    from sqakd.config import MethodConfig, TrainConfig
    from sqakd.data import BatchAugment, BatchLoader, ImageArray
    from sqakd.engine import RunLog, Trainer, teacher_for
    from sqakd.engine.distributed import init_distributed, per_rank_batch_size
    from sqakd.methods import build_method
    from sqakd.models import build_model
    from sqakd.quant import QuantPolicy, calibrate, prepare

    torch.set_num_threads(args.threads)
    context, _ = init_distributed("cpu")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    count = args.batch_size * (args.steps + args.warmup)
    data = ImageArray(rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8))
    augment = BatchAugment(pad=4, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    loader = BatchLoader(data, per_rank_batch_size(args.batch_size, context), augment=augment,
                         drop_last=True, with_labels=False,
                         shard=(context.rank, context.world_size) if context.enabled else None)  # fmt: skip
    teacher = build_model("resnet20", num_classes=10).eval()
    student = prepare(copy.deepcopy(teacher), QuantPolicy(method="ewgs", weight_bits=4, act_bits=4))
    calibrate(student, [next(iter(loader))[0]])
    teacher = teacher_for("features", teacher)  # frozen, unfolded, as this benchmark always ran it
    trainer = Trainer(student.train(), teacher, build_method(MethodConfig()), loader,
                      TrainConfig(epochs=2), torch.device("cpu"), RunLog(Path("."), enabled=False),
                      progress=False, distributed=context)  # fmt: skip
    trainer.steps_per_epoch = args.warmup
    trainer.train_epoch()
    trainer.epoch, trainer.batch_in_epoch, trainer.steps_per_epoch = 1, 0, args.steps
    row = trainer.train_epoch()
    if context.is_main:
        print(json.dumps({"images_per_s": row["images_per_s"]}), flush=True)
    if context.enabled:
        torch.distributed.destroy_process_group()


def measure(processes: int, threads: int, args: argparse.Namespace) -> float:
    """Images/s of one run with ``processes`` ranks of ``threads`` threads each."""
    command = [HERE.name, "--worker", "--threads", str(threads), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]  # fmt: skip
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *command]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, *command], cwd=HERE.parent, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    line = next(line for line in done.stdout.splitlines() if line.startswith("{"))
    return json.loads(line)["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=2, help="threads in total")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from _timing import machine

    print(f"SQAKD W4A4 ResNet-20, global batch {args.batch_size}, {args.cores} threads in total; "
          f"{machine()}; median of {args.repeats} runs\n")  # fmt: skip
    print("| layout | images/s (median) | runs |")
    print("|---|---|---|")
    layouts = [(1, args.cores), (args.cores, 1)] if args.cores > 1 else [(1, 1)]
    results: dict[tuple[int, int], list[float]] = {layout: [] for layout in layouts}
    for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
        for processes, threads in layouts:
            results[(processes, threads)].append(measure(processes, threads, args))
    for (processes, threads), rates in results.items():
        runs = ", ".join(f"{rate:.0f}" for rate in rates)
        print(
            f"| {processes} process x {threads} thread(s) | {statistics.median(rates):.0f} | {runs} |"
        )


if __name__ == "__main__":
    main()

"""FA against FFA (FAQD's feature-affinity losses): seconds and peak memory of one call, forward +
backward to the student map, for square maps of 8x8 to 64x64 at batch 64 and 64 channels
(student and teacher maps of the same size, order 1, FFA with k = 15).

Time: median over interleaved rounds (FA then FFA in every round), after two warm-up calls each.
Peak memory: the largest sum of the sizes of all CPU allocations minus frees made during one
call (outside the timings), in time order, from the allocation events of ``torch.profiler`` with
``profile_memory=True`` (read through its event tree, ``torch._C._profiler``); it counts
everything the call allocates (the student map's gradient included), not the inputs.

FA materialises [B, N, N] float tensors (4 GiB each at 64x64, batch 64), so when one of them
would exceed --fa-chunk-mib the FA call runs over chunks of the batch, each chunk forward +
backward (exact, since FA sums over the batch: the loss and the gradient are the sums over
chunks). Its time is that of the whole batch. Its peak is measured unchunked at batches b = c
and c/2 (the first samples); every tensor FA allocates is proportional to the batch, so the
peak at batch B is estimated as peak(c) + (B - c) (peak(c) - peak(c/2)) / (c/2), marked "~" in
the table, with the two measured peaks printed below it.

Run: python benchmarks/affinity.py [--sizes 8 16 32 64] [--batch-size 64] [--channels 64]
[--rounds 7] [--per-round 5] [--big-rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import interleaved_medians, machine
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from sqakd.distill import fast_feature_affinity_loss, feature_affinity_loss, gaussian_projection


def peak_memory(step: Callable[[], None]) -> int:
    """Peak bytes allocated by ``step`` above what was allocated before it: every CPU allocation
    and free the profiler records (``profile_memory=True``), in time order, summed as it goes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    sizes: list[tuple[int, int]] = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    allocated = peak = 0
    for _, size in sorted(sizes):
        allocated += size
        peak = max(peak, allocated)
    return peak


def fa_step(student: torch.Tensor, teacher: torch.Tensor, chunk: int) -> Callable[[], None]:
    def step() -> None:
        student.grad = None
        for start in range(0, student.shape[0], chunk):
            end = start + chunk
            feature_affinity_loss(student[start:end], teacher[start:end]).backward()

    return step


def ffa_step(student: torch.Tensor, teacher: torch.Tensor, k: int) -> Callable[[], None]:
    projection = gaussian_projection(student.shape[-2] * student.shape[-1], k)

    def step() -> None:
        student.grad = None
        fast_feature_affinity_loss(student, teacher, projection).backward()

    return step


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds per size")
    parser.add_argument("--per-round", type=int, default=5, help="calls per round (median)")
    parser.add_argument(
        "--big-rounds", type=int, default=2, help="timing rounds when FA runs in chunks"
    )
    parser.add_argument("--fa-chunk-mib", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"batch {args.batch_size}, {args.channels} channels, FFA k = {args.k}, order 1\n")
    cases = []
    for size in args.sizes:
        generator = torch.Generator().manual_seed(size)
        shape = (args.batch_size, args.channels, size, size)
        student = torch.relu(torch.randn(shape, generator=generator)).requires_grad_()
        teacher = torch.relu(torch.randn(shape, generator=generator))
        chunk = max(1, min(args.batch_size, args.fa_chunk_mib * 2**20 // (size**4 * 4)))
        steps = {"FA": fa_step(student, teacher, chunk), "FFA": ffa_step(student, teacher, args.k)}
        if chunk < args.batch_size:
            seconds = interleaved_medians(steps, rounds=args.big_rounds, per_round=1)
        else:
            seconds = interleaved_medians(steps, rounds=args.rounds, per_round=args.per_round)
        print(f"{size}x{size} seconds: {seconds}", flush=True)
        cases.append((size, chunk, steps, seconds, student))
    rows, notes = [], []
    for size, chunk, steps, seconds, student in cases:
        memory = {}
        for name, step in steps.items():
            student.grad = None  # freed before the profile, not counted inside it
            memory[name] = peak_memory(step)
        fa_peak = f"{mib(memory['FA'])}"
        if chunk < args.batch_size:
            measured = {}
            for batch in (chunk // 2, chunk):
                part = student[:batch].detach().clone().requires_grad_()
                measured[batch] = peak_memory(fa_step(part, teacher[:batch], batch))
            (half, half_peak), (_, chunk_peak) = sorted(measured.items())
            slope = (chunk_peak - half_peak) / (chunk - half)
            notes.append(
                f"{size}x{size}: FA peak measured unchunked at batch {half}: {mib(half_peak)} MiB, "
                f"at batch {chunk}: {mib(chunk_peak)} MiB; with chunks of {chunk} at batch "
                f"{args.batch_size}: {mib(memory['FA'])} MiB"
            )
            memory["FA"] = int(chunk_peak + slope * (args.batch_size - chunk))
            fa_peak = f"~{mib(memory['FA'])}"
        print(f"{size}x{size} peak bytes: {memory}", flush=True)
        rows.append((size, size * size, chunk, seconds, memory, fa_peak))
    print(
        "\n| map | N | FA s/call | FFA s/call | FA/FFA time | FA peak MiB | FFA peak MiB "
        "| FA/FFA memory |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size, n, chunk, seconds, memory, fa_peak in rows:
        note = f" (FA in chunks of {chunk})" if chunk < args.batch_size else ""
        print(
            f"| {size}x{size}{note} | {n} | {seconds['FA']:.4f} | {seconds['FFA']:.4f} "
            f"| {seconds['FA'] / seconds['FFA']:.1f} | {fa_peak} | {mib(memory['FFA'])} "
            f"| {memory['FA'] / memory['FFA']:.1f} |"
        )
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()

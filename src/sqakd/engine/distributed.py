"""Multi-process training with ``torch.distributed``, started by ``torchrun``.

``torchrun --nproc_per_node=N -m sqakd quantize ...`` starts N copies of the same command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`init_distributed` reads
them and joins the process group (gloo on CPU, NCCL on CUDA); without them (or with
``WORLD_SIZE=1``) nothing changes and the run is the plain single-process one.

The recipe in a multi-process run:

- ``data.batch_size`` is the global batch: each rank takes ``batch_size / world_size`` images of
  every global batch (the loader's ``shard=(rank, world_size)``), so N processes see exactly the
  batches one process would see, split N ways.
- The student is wrapped in ``DistributedDataParallel``: gradients are averaged over ranks, which
  for a loss that is a batch mean equals the gradient of the global batch's mean. Quantizer ranges
  are ordinary parameters, so they stay in sync like any weight.
- Every rank calibrates on the same (unsharded) first batch, and the calibrated state is then
  broadcast from rank 0, so quantizers start identical everywhere.
- ``run.sync_batchnorm``: batch statistics over the global batch (``nn.SyncBatchNorm`` on CUDA,
  :class:`CPUSyncBatchNorm` with gloo on CPU, where PyTorch's own refuses to run).
- Metrics are reduced over ranks; logs, CSV, checkpoints and plots come from rank 0 only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .evaluate import evaluate

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is in a multi-process run (``world_size == 1``: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file and prints the logs."""
        return self.rank == 0


SINGLE_PROCESS = DistributedContext()


def torchrun_environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or ``None`` outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world_size, local_rank


def rank_device(device_name: str, local_rank: int) -> str:
    """The device of one rank: ``cuda``/``auto`` become ``cuda:LOCAL_RANK``; CPU stays CPU."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda":
        return f"cuda:{local_rank}"
    if device_name.startswith("cuda:"):
        raise ValueError(
            f"run.device is {device_name!r}, which would put every rank on one GPU; "
            "set run.device: cuda and torchrun gives rank r the GPU LOCAL_RANK"
        )
    return device_name


def init_distributed(
    device_name: str = "cpu", timeout_minutes: float = 30.0
) -> tuple[DistributedContext, str]:
    """Join the process group when torchrun started this process; return the context and the
    device name this rank should use. Outside torchrun (or ``WORLD_SIZE=1``): the single-process
    context and ``device_name`` unchanged."""
    environment = torchrun_environment()
    if environment is None or environment[1] <= 1:
        return SINGLE_PROCESS, device_name
    rank, world_size, local_rank = environment
    device = rank_device(device_name, local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes)
        )
    return DistributedContext(rank, world_size, local_rank, backend), device


def shutdown_distributed() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch_size(batch_size: int, context: DistributedContext) -> int:
    """``batch_size / world_size``: ``data.batch_size`` is the global batch of every step."""
    if batch_size % context.world_size:
        raise ValueError(
            f"data.batch_size {batch_size} is not divisible by the {context.world_size} processes; "
            f"choose a multiple of {context.world_size} (it is the global batch, split over processes)"
        )
    return batch_size // context.world_size


# ------------------------------------------------------------------------------- collectives
def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


@contextmanager
def main_process_first(context: DistributedContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. decoding into the cache), then the others."""
    if not context.is_main:
        barrier(context)
    yield
    if context.is_main:
        barrier(context)


def run_on_main(function: Any, context: DistributedContext) -> Any:
    """Call ``function()`` on rank 0 only; every rank gets its result, or raises the same
    ``ValueError`` when it raised one (so a refused run folder stops all ranks cleanly)."""
    if not context.enabled:
        return function()
    outcome: list[Any] = [None]
    if context.is_main:
        try:
            outcome = [("ok", function())]
        except ValueError as error:
            outcome = [("error", str(error))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise ValueError(value)
    return value


def gather_objects(value: T, context: DistributedContext) -> list[T]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def reduce_sums(values: dict[str, float], context: DistributedContext) -> dict[str, float]:
    """Sum each value over ranks (one collective for the whole dictionary)."""
    if not context.enabled or not values:
        return dict(values)
    names = sorted(values)
    packed = torch.tensor([float(values[name]) for name in names], dtype=torch.float64)
    if context.backend == "nccl":
        packed = packed.cuda()
    dist.all_reduce(packed)
    totals = dict(zip(names, packed.tolist()))
    return {name: float(totals[name]) for name in values}  # the caller's order


def reduce_means(values: dict[str, float], context: DistributedContext) -> dict[str, float]:
    """The mean of each value over ranks."""
    totals = reduce_sums(values, context)
    return {name: total / context.world_size for name, total in totals.items()}


@torch.no_grad()
def broadcast_module_state(module: nn.Module, context: DistributedContext, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (shapes must agree)."""
    if not context.enabled:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter], context: DistributedContext) -> None:
    """Average the gradients of ``parameters`` over ranks (for modules that no
    DistributedDataParallel wrapper syncs: a method's adapters or generator, a trainable
    teacher). One all-reduce of the flattened gradients."""
    if not context.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


# ---------------------------------------------------------------------------------- evaluation
class _Counted:
    """Yields a loader's batches and counts the labeled images."""

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor | None]]) -> None:
        self.batches, self.count = batches, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        for images, labels in self.batches:
            self.count += 0 if labels is None else int(labels.shape[0])
            yield images, labels


def evaluate_sharded(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    device: torch.device | str,
    context: DistributedContext,
) -> dict[str, float]:
    """:func:`~sqakd.engine.evaluate.evaluate` on this rank's disjoint part of the test set, the
    results weighted by each rank's image count: exactly the whole set's top-1/top-5/loss."""
    if not context.enabled:
        return evaluate(model, batches, device)
    counted = _Counted(batches)
    metrics = evaluate(model, counted, device)
    weighted = {name: value * counted.count for name, value in metrics.items()}
    weighted["images"] = float(counted.count)
    totals = reduce_sums(weighted, context)
    images = totals.pop("images")
    return {name: value / images for name, value in totals.items()}


# --------------------------------------------------------------------------- model wrapping
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks too."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        total = grad.clone()
        dist.all_reduce(total)
        return total


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics span every rank's batch, for gloo/CPU runs
    (``nn.SyncBatchNorm`` only runs on CUDA).

    Per channel c over all ranks' images: ``mean = sum(x) / n``, ``var = sum(x**2) / n - mean**2``
    (one all-reduce of ``[sum, sum of squares, n]``, differentiable, so the backward sums the
    statistics' gradients over ranks as well); running statistics use the unbiased
    ``var * n / (n - 1)``. Outside training, or without a process group, it is ``BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(
                f"CPUSyncBatchNorm expects (N, C, H, W) input, got shape {tuple(x.shape)}"
            )
        channels = x.shape[1]
        count = torch.full((1,), float(x.numel() // channels), dtype=x.dtype, device=x.device)
        local = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        total = _AllReduceSum.apply(local)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum
                if momentum is None:  # cumulative average, as BatchNorm2d
                    momentum = 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        shape = (1, channels, 1, 1)
        scale = torch.rsqrt(var + self.eps)
        out = (x - mean.view(shape)) * scale.view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``BatchNorm2d`` by a synchronised one sharing its parameters and buffers
    (``nn.SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` elsewhere). Returns the new root."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        synced = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module


def wrap_for_training(
    student: nn.Module,
    context: DistributedContext,
    device: torch.device,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """``DistributedDataParallel(student)`` in a multi-process run, else ``student`` itself.

    DDP starts by broadcasting rank 0's parameters and buffers, and keeps buffers (batch-norm
    statistics, quantizer state) in sync by broadcasting them from rank 0 before every forward.
    """
    if not context.enabled:
        return student
    device_ids = (
        [device.index if device.index is not None else 0] if device.type == "cuda" else None
    )
    return nn.parallel.DistributedDataParallel(
        student, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a ``DistributedDataParallel`` or ``torch.compile`` wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


__all__ = [
    "SINGLE_PROCESS",
    "CPUSyncBatchNorm",
    "average_gradients",
    "DistributedContext",
    "barrier",
    "broadcast_module_state",
    "convert_sync_batchnorm",
    "evaluate_sharded",
    "gather_objects",
    "init_distributed",
    "main_process_first",
    "per_rank_batch_size",
    "rank_device",
    "reduce_means",
    "reduce_sums",
    "run_on_main",
    "shutdown_distributed",
    "torchrun_environment",
    "unwrap_model",
    "wrap_for_training",
]

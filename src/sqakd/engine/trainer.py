"""The training loop shared by every method: epochs, optimizers per parameter group, evaluation,
checkpoints (also mid-epoch, for exact resume), logs and a progress bar, in one process or in
several under torchrun. What a step computes belongs to the method."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..methods.base import Method
from ..quant.layers import model_parameters, quantizer_parameters
from .checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    load_training_checkpoint,
    restore_rng_state,
    save_weights,
)
from .distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    broadcast_module_state,
    convert_sync_batchnorm,
    evaluate_sharded,
    gather_objects,
    reduce_means,
    reduce_sums,
    unwrap_model,
    wrap_for_training,
)
from .logs import RunLog
from .optim import build_optimizer, build_scheduler

CHECKPOINT_FORMAT = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class FitResult:
    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    validation: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def parameter_groups(student: nn.Module, method: Method) -> dict[str, list[nn.Parameter]]:
    """``weights`` (everything but quantizers) and, for quantized students, ``quantizers``."""
    groups = {"weights": [p for p in model_parameters(student) if p.requires_grad]}
    quant = [p for p in quantizer_parameters(student) if p.requires_grad]
    if method.quantizes_student and quant:
        groups["quantizers"] = quant
    return groups


class Trainer:
    """Runs ``method`` on ``student`` for ``config.epochs`` epochs.

    ``train_loader`` yields ``(images, labels or None)`` and has ``__len__``; ``set_epoch(e)``
    and ``skip_batches(k)`` are used when present (a loader without ``skip_batches`` is
    fast-forwarded by drawing and dropping k batches on a mid-epoch resume).
    ``eval_loader``/``val_loader`` yield labeled batches (either may be ``None``).

    Multi-process (``distributed`` from :func:`~sqakd.engine.distributed.init_distributed`):
    the loaders must already give this rank's shard; the student is wrapped in
    ``DistributedDataParallel`` (with synchronised batch norm when ``sync_batchnorm``), metrics
    are reduced over ranks, and only rank 0 writes checkpoints and logs. ``self.student`` is
    always the plain model; ``self.model`` is what the method calls (the DDP wrapper, if any).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        method: Method,
        train_loader: Any,
        config: TrainConfig,
        device: torch.device,
        log: RunLog,
        eval_loader: Iterable | None = None,
        val_loader: Iterable | None = None,
        checkpoint_dir: Path | None = None,
        progress: bool = True,
        distributed: DistributedContext | None = None,
        sync_batchnorm: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.context = distributed or SINGLE_PROCESS
        if sync_batchnorm and self.context.enabled:
            student = convert_sync_batchnorm(student, torch.device(device))
        # NHWC for models, teacher and batches (run.channels_last): faster convolutions on CPU
        # with the compiled quantizer kernels; values are the same up to float rounding
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            student.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher.to(memory_format=torch.channels_last)
        self.student, self.teacher, self.method = student, teacher, method
        self.train_loader, self.eval_loader, self.val_loader = train_loader, eval_loader, val_loader
        self.config, self.device, self.log = config, device, log
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress and self.context.is_main
        self.steps_per_epoch = len(train_loader)
        if config.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps_per_epoch)
        total_steps = self.steps_per_epoch * config.epochs
        settings = {"weights": config.weights, "quantizers": config.quantizers}
        self.optimizers = {
            name: build_optimizer(params, settings[name])
            for name, params in parameter_groups(student, method).items()
        }
        self.schedulers = {
            name: build_scheduler(opt, settings[name], total_steps, self.steps_per_epoch)
            for name, opt in self.optimizers.items()
        }
        # identical quantizer ranges and weights on every rank before the first step
        broadcast_module_state(student, self.context)
        self.model = wrap_for_training(
            student,
            self.context,
            torch.device(device),
            find_unused_parameters=getattr(method, "find_unused_parameters", False),
        )
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps over the whole run
        self.batch_in_epoch = 0  # completed steps of the current epoch (mid-epoch resume)
        self.epoch_sums: dict[str, float] = {}  # running loss sums of the current epoch
        self.epoch_images = 0
        self.best_score = -math.inf
        self.result = FitResult()
        if teacher is not None:
            teacher.eval()
            for parameter in teacher.parameters():
                parameter.requires_grad_(False)

    # ------------------------------------------------------------------------------- one step
    def train_step(self, images: Tensor, labels: Tensor | None) -> dict[str, float]:
        """One optimizer step on one batch; returns this rank's loss values."""
        images = images.to(self.device, non_blocking=True)
        if images.dim() == 4:
            images = images.contiguous(memory_format=self.memory_format)
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
        output = self.method.training_step(self.model, self.teacher, images, labels)
        loss = output.total
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {float(loss.detach())} at epoch {self.epoch + 1}, step {self.step}; the last good "
                "checkpoint is kept. Lower train.weights.lr or set train.grad_clip (e.g. 5.0)"
            )
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
        for optimizer in self.optimizers.values():
            optimizer.step()
        for scheduler in self.schedulers.values():
            scheduler.step()
        self.step += 1
        values = {name: float(value.detach()) for name, value in output.losses.items()}
        values["loss"] = float(loss.detach())
        return values

    def _batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """This epoch's batches from ``batch_in_epoch`` on."""
        loader, start = self.train_loader, self.batch_in_epoch
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        if start and hasattr(loader, "skip_batches"):
            loader.skip_batches(start)
            return iter(loader)
        return islice(iter(loader), start, None)

    def train_epoch(self) -> dict[str, float]:
        """Train the rest of the current epoch; return its mean losses (over ranks) and speed."""
        self.model.train()
        images_now = 0
        start = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            unit="batch",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        )
        batches = self._batches()
        while self.batch_in_epoch < self.steps_per_epoch:
            batch = next(batches, None)
            if batch is None:
                break
            images, labels = batch
            values = self.train_step(images, labels)
            for name, value in values.items():
                self.epoch_sums[name] = self.epoch_sums.get(name, 0.0) + value
            self.epoch_images += images.shape[0]
            images_now += images.shape[0]
            self.batch_in_epoch += 1
            if self.progress:
                bar.update(1)
                rate = images_now * self.context.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.0f}")
            if self._mid_epoch_checkpoint_due():
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - start
        steps = max(self.batch_in_epoch, 1)
        averages = reduce_means(
            {f"train_{k}": v / steps for k, v in self.epoch_sums.items()}, self.context
        )
        speed = reduce_sums({"images": float(images_now)}, self.context)["images"]
        averages["images_per_s"] = speed / seconds if seconds > 0 else 0.0
        averages["epoch_seconds"] = seconds
        return averages

    def _mid_epoch_checkpoint_due(self) -> bool:
        every = getattr(self.config, "checkpoint_every_steps", None)
        return bool(
            every
            and self.checkpoint_dir is not None
            and self.step % every == 0
            and self.batch_in_epoch < self.steps_per_epoch  # the epoch's end writes its own
        )

    # ------------------------------------------------------------------------------- the run
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Top-1/top-5/loss of the student on ``loader`` (every rank its shard, then reduced)."""
        # every rank evaluates rank 0's model (batch-norm statistics are per rank otherwise)
        broadcast_module_state(self.student, self.context)
        return evaluate_sharded(self.student, loader, self.device, self.context)

    def fit(self) -> FitResult:
        start = time.perf_counter()
        rates = []
        while self.epoch < self.config.epochs:
            row: dict[str, Any] = {"epoch": self.epoch + 1}
            if self._ewgs_update_due():
                self.update_ewgs_deltas()
            row.update(self.train_epoch())
            rates.append(row["images_per_s"])
            for name, optimizer in self.optimizers.items():
                row[f"lr_{name}"] = optimizer.param_groups[0]["lr"]
            if self.val_loader is not None:
                row.update({f"val_{k}": v for k, v in self.evaluate(self.val_loader).items()})
            if self.eval_loader is not None:
                row.update({f"test_{k}": v for k, v in self.evaluate(self.eval_loader).items()})
            self.epoch += 1
            self.batch_in_epoch, self.epoch_sums, self.epoch_images = 0, {}, 0
            self._record(row)
        self.result.seconds = time.perf_counter() - start
        self.result.images_per_second = sum(rates) / len(rates) if rates else 0.0
        return self.result

    # -------------------------------------------------------------------- EWGS delta update
    def _ewgs_update_due(self) -> bool:
        every = getattr(self.config, "ewgs_delta_every_epochs", None)
        return bool(every) and self.batch_in_epoch == 0 and self.epoch % every == 0

    def update_ewgs_deltas(self) -> dict[str, float]:
        """EWGS's Hessian-based delta update (Lee et al., Sec. 3.3) on the first
        ``train.ewgs_delta_batches`` batches of this epoch, with this method's own loss. The
        loader is rewound afterwards (``set_epoch``), so training sees the same batches as
        without the update. Under DDP the deltas are buffers, broadcast from rank 0."""
        from ..quant.methods.ewgs import update_ewgs_deltas

        model = unwrap_model(self.model)

        def loss(network: nn.Module, batch: Any) -> Tensor:
            images, labels = batch
            return self.method.training_step(network, self.teacher, images, labels).total

        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        model.train()
        count = getattr(self.config, "ewgs_delta_batches", 3)
        deltas = update_ewgs_deltas(model, loss, islice(iter(loader), count), num_batches=count)
        if deltas:
            values = sorted(deltas.values())
            self.log.info(
                "EWGS delta update (epoch %d): %d quantizers, delta %.3g .. %.3g (median %.3g)",
                self.epoch + 1, len(values), values[0], values[-1], values[len(values) // 2],
            )  # fmt: skip
        return deltas

    def _record(self, row: dict[str, Any]) -> None:
        self.result.history.append(row)
        self.result.last = {k[5:]: v for k, v in row.items() if k.startswith("test_")}
        validation = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
        score = validation.get("top1", self.result.last.get("top1", -row.get("train_loss", 0.0)))
        improved = score > self.best_score
        if improved:
            self.best_score = score
            self.result.best = dict(self.result.last)
            self.result.best_epoch = self.epoch
            if validation:
                self.result.validation = validation
        if self.context.is_main:
            self.log.metrics(row, self.step)
            summary = ", ".join(
                f"{k} {v:.4g}"
                for k, v in row.items()
                if k != "epoch" and isinstance(v, float) and not k.startswith("lr_")
            )
            self.log.info("epoch %d/%d: %s", self.epoch, self.config.epochs, summary)
        if self.checkpoint_dir is not None:
            if self.epoch % self.config.checkpoint_every == 0 or self.epoch == self.config.epochs:
                self.save_checkpoint()
            if improved and self.context.is_main:
                save_weights(self.student, self.checkpoint_dir / "best.safetensors")

    # ------------------------------------------------------------------------------- resume
    def save_checkpoint(self, path: Path | None = None) -> Path | None:
        """Write :meth:`state_dict` atomically to ``checkpoints/last.pt`` (rank 0 writes; every
        rank must call this, since the random-number states are gathered from all ranks)."""
        state = self.state_dict()
        if not self.context.is_main:
            return None
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("this trainer has no checkpoint_dir; give a path to save to")
            path = self.checkpoint_dir / "last.pt"
        return atomic_torch_save(state, path)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, even from the middle of an epoch: weights,
        quantizers, optimizers, schedules, the method's own state, counters (epoch, step, step
        within the epoch), the epoch's running loss sums, the metric history, and the random
        states of every rank (Python, NumPy, torch, CUDA). The loader's order and augmentation
        are seeded by (seed, epoch, rank, batch), so the counters restore them; a loader with
        its own ``state_dict`` is saved too."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_sums": dict(self.epoch_sums),
            "epoch_images": self.epoch_images,
            "best_score": self.best_score,
            "best_epoch": self.result.best_epoch,
            "best": self.result.best,
            "validation": self.result.validation,
            "history": list(self.result.history),
            "world_size": self.context.world_size,
            "rng": gather_objects(capture_rng_state(), self.context),
        }
        if hasattr(self.train_loader, "state_dict"):
            state["loader"] = self.train_loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        batch_in_epoch = int(state.get("batch_in_epoch", 0))
        saved_world = int(state.get("world_size", 1))
        if batch_in_epoch and saved_world != self.context.world_size:
            raise ValueError(
                f"the checkpoint was written mid-epoch by {saved_world} process(es) and this run has "
                f"{self.context.world_size}; resume with --nproc_per_node={saved_world}, or from an "
                "end-of-epoch checkpoint (train.checkpoint_every_steps unset)"
            )
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.batch_in_epoch = batch_in_epoch
        self.epoch_sums = {k: float(v) for k, v in state.get("epoch_sums", {}).items()}
        self.epoch_images = int(state.get("epoch_images", 0))
        self.best_score = float(state["best_score"])
        self.result.best_epoch = int(state["best_epoch"])
        self.result.best = dict(state["best"])
        self.result.validation = dict(state.get("validation", {}))
        self.result.history = [dict(row) for row in state.get("history", [])]
        if self.result.history:
            last_row = self.result.history[-1]
            self.result.last = {k[5:]: v for k, v in last_row.items() if k.startswith("test_")}
        if "loader" in state and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["loader"])
        if "rng" in state:
            states = state["rng"]
            restore_rng_state(
                states[self.context.rank] if len(states) > self.context.rank else states[0]
            )
        elif "rng_torch" in state:  # checkpoints written before format 2
            torch.set_rng_state(state["rng_torch"])

    def resume(self, path: Path) -> Path:
        """Continue from ``path`` (or its ``.prev`` when ``path`` is unreadable). The metrics
        CSV is rewritten from the checkpoint's history, so epochs after it are not listed twice."""
        state, used = load_training_checkpoint(path)
        self.load_state_dict(state)
        if self.context.is_main:
            self.log.rewrite_metrics(self.result.history)
            where = (
                f"epoch {self.epoch + 1}, batch {self.batch_in_epoch}"
                if self.batch_in_epoch
                else f"the end of epoch {self.epoch}"
            )
            self.log.info("resumed from %s at %s (step %d)", used, where, self.step)
        return used

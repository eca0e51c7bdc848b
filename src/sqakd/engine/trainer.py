"""The training loop shared by every method: epochs and phases, one optimizer and schedule per
parameter group, evaluation, checkpoints (also mid-epoch, for exact resume), logs and a progress
bar, in one process or in several under torchrun. What a step computes belongs to the method
(:mod:`sqakd.methods.base`): the trainer hands it the models, the batch and a :class:`TrainerStep`
whose ``update`` does the optimisation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..methods.base import (
    TEACHER_GROUP,
    Batch,
    Method,
    Models,
    Phase,
    check_phases,
    phase_at,
)
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
    average_gradients,
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
from .precision import autocast, check_precision, full_precision, gradient_scaler
from .teacher import check_teacher_role

CHECKPOINT_FORMAT = 2


#: how many times the student's weight norm may grow over its value at the start of the run
#: before the run is stopped as diverged (healthy runs stay within a few times)
DIVERGENCE_FACTOR = 1e3


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or the weights blew up; the last good checkpoint is kept."""


class EpochHook(Protocol):
    """Called at the start of every epoch (before its first batch), e.g. EWGS's delta update
    (:class:`sqakd.quant.methods.ewgs.EWGSDeltaSchedule`). ``loss(network, batch)`` is the
    method's summed loss on one raw loader batch with ``network`` as the student; ``batches``
    are this epoch's batches (the loader is rewound afterwards, so training sees the same ones)."""

    def __call__(
        self,
        epoch: int,
        model: nn.Module,
        loss: Callable[[nn.Module, Any], Tensor],
        batches: Iterator[Any],
    ) -> Any: ...


@dataclass
class FitResult:
    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    validation: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainerStep:
    """The :class:`~sqakd.methods.base.Step` handle of one batch."""

    def __init__(self, trainer: Trainer, phase: Phase) -> None:
        self.trainer, self.phase = trainer, phase
        self.epoch, self.device = trainer.epoch, torch.device(trainer.device)

    def update(self, losses: Mapping[str, Tensor], groups: Sequence[str] | None = None) -> None:
        self.trainer.update(losses, self.phase, groups)


class Trainer:
    """Runs ``method`` on ``student`` for ``config.epochs`` epochs.

    ``teacher`` must already be prepared for the method's declared role
    (:func:`sqakd.engine.teacher.teacher_for`). ``train_loader`` yields ``(images, labels or
    None)``, ``(images, labels, index)``, :class:`~sqakd.methods.base.Batch` items or, for a
    data-free method, batch sizes (:class:`~sqakd.data.SizeOnlyBatches`), and has
    ``__len__``; ``set_epoch(e)`` and ``skip_batches(k)`` are used when present (a loader without
    ``skip_batches`` is fast-forwarded by drawing and dropping k batches on a mid-epoch resume).
    ``eval_loader``/``val_loader`` yield labeled batches (either may be ``None``).

    Optimizers: one per non-empty group of ``method.parameter_groups``, with the settings of
    ``config.optimizer_for(group)`` or else ``method.optimizer_settings(group, config.weights)``;
    each group's schedule spans the steps of the phases that train it.

    Multi-process (``distributed`` from :func:`~sqakd.engine.distributed.init_distributed`):
    the loaders must already give this rank's shard; the student is wrapped in
    ``DistributedDataParallel`` (with synchronised batch norm when ``sync_batchnorm``), the
    gradients of groups outside the student (adapters, a trainable teacher) are averaged over
    ranks in :meth:`update`, metrics are reduced over ranks, and only rank 0 writes checkpoints
    and logs. ``self.student`` is always the plain model; ``self.model`` is what the method
    calls (the DDP wrapper, if any).

    ``precision`` (``run.precision``, :mod:`sqakd.engine.precision`): ``bf16`` or ``fp16`` run
    the method's step under ``torch.autocast`` on ``device``'s type; :meth:`update` (backward,
    clipping, optimizer steps) runs with autocast off, through a gradient scaler for fp16.
    Evaluation and the epoch hooks run in float32.
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
        epoch_hooks: Sequence[EpochHook] = (),
        weights_metadata: Mapping[str, str] | None = None,
        precision: str = "float32",
    ) -> None:
        check_precision(precision, device)
        self.precision = precision
        # fp16 only: gradients scaled against underflow (disabled: every call passes through)
        self.scaler = gradient_scaler(precision, device)
        self.context = distributed or SINGLE_PROCESS
        needs = method.needs
        check_teacher_role(needs.teacher, teacher)
        if sync_batchnorm and self.context.enabled:
            student = convert_sync_batchnorm(student, torch.device(device))
        # NHWC for the student and batches (run.channels_last): faster convolutions on CPU with
        # the compiled quantizer kernels; values are the same up to float rounding. The teacher
        # is converted where it is prepared (teacher_for).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            student.to(memory_format=torch.channels_last)
        method.to(device)
        self.student, self.teacher, self.method = student, teacher, method
        self.train_loader, self.eval_loader, self.val_loader = train_loader, eval_loader, val_loader
        self.config, self.device, self.log = config, device, log
        self.checkpoint_dir = checkpoint_dir
        self.epoch_hooks = list(epoch_hooks)
        self.weights_metadata = dict(weights_metadata or {})
        self.progress = progress and self.context.is_main
        self.steps_per_epoch = len(train_loader)
        if config.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps_per_epoch)
        groups = method.parameter_groups(Models(student, teacher))
        self.phases = method.phases(config.epochs)
        check_phases(self.phases, config.epochs, groups)
        self.group_names = set(groups)
        self.groups = {name: params for name, params in groups.items() if params}
        if not self.groups:
            raise ValueError(
                "nothing to train: no parameter of the student or the method requires gradients "
                "(was the student copied from a frozen teacher?)"
            )
        self.optimizers = {}
        self.schedulers = {}
        for name, params in self.groups.items():
            settings = config.optimizer_for(name) or method.optimizer_settings(name, config.weights)
            trained_epochs = sum(p.epochs for p in self.phases if self._trains(p, name))
            self.optimizers[name] = build_optimizer(params, settings)
            self.schedulers[name] = build_scheduler(
                self.optimizers[name],
                settings,
                self.steps_per_epoch * trained_epochs,
                self.steps_per_epoch,
            )
        # identical quantizer ranges, weights and method state on every rank before the first step
        student_ids = {id(p) for p in student.parameters()}
        self._synced_apart = {  # groups no DDP wrapper syncs
            name for name, params in self.groups.items()
            if any(id(p) not in student_ids for p in params)
        }  # fmt: skip
        for module in (student, method, teacher if needs.teacher == "trainable" else None):
            if module is not None:
                broadcast_module_state(module, self.context)
        self.model = wrap_for_training(
            student,
            self.context,
            torch.device(device),
            find_unused_parameters=needs.find_unused_parameters,
        )
        self.models = Models(self.model, teacher)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed batches over the whole run
        self.batch_in_epoch = 0  # completed batches of the current epoch (mid-epoch resume)
        self.epoch_sums: dict[str, float] = {}  # running loss sums of the current epoch
        self.epoch_images = 0
        self.best_score = -math.inf
        self.result = FitResult()
        self.reference_norm = self.weight_norm()  # the divergence guard's yardsticks
        self.reference_loss: dict[str, float] = {}  # each phase's first epoch's mean loss

    # ----------------------------------------------------------------------------- phases
    def _trains(self, phase: Phase, group: str) -> bool:
        return phase.trains is None or group in phase.trains

    @property
    def phase(self) -> Phase:
        """The phase of the current epoch (a pure function of the epoch counter)."""
        return phase_at(self.phases, self.epoch)

    def _enter_phase(self, phase: Phase) -> None:
        """Train/eval modes for the phase: the student and the method train; a trainable teacher
        trains only in phases that train its group; then the method's own ``enter_phase``."""
        self.model.train()
        self.method.train()
        if self.method.needs.teacher == "trainable" and self.teacher is not None:
            self.teacher.train(self._trains(phase, TEACHER_GROUP))
        self.method.enter_phase(Models(self.student, self.teacher), phase)
        first_epoch = sum(p.epochs for p in self.phases[: self.phases.index(phase)])
        if len(self.phases) > 1 and self.epoch == first_epoch and self.batch_in_epoch == 0:
            trained = ", ".join(g for g in self.groups if self._trains(phase, g))
            self.log.info(
                "phase %s: epochs %d-%d, training %s",
                phase.name, first_epoch + 1, first_epoch + phase.epochs, trained,
            )  # fmt: skip

    # ------------------------------------------------------------------------------- one step
    def update(
        self, losses: Mapping[str, Tensor], phase: Phase, groups: Sequence[str] | None = None
    ) -> None:
        """zero-grad -> finite check -> backward of the summed losses -> clip -> optimizer and
        schedule steps, for ``groups`` (default: every group ``phase`` trains)."""
        trained = [g for g in self.groups if self._trains(phase, g)]
        if groups is None:
            names = trained
        else:
            stray = [g for g in groups if g not in self.group_names or not self._trains(phase, g)]
            if stray:
                raise ValueError(
                    f"update of group {stray[0]!r}, which phase {phase.name!r} does not train "
                    f"(it trains: {', '.join(trained) or 'nothing'})"
                )
            names = [g for g in groups if g in self.groups]  # empty groups have no optimizer
        if not losses:
            raise ValueError("update got no loss; return at least one named loss term")
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise TrainingDiverged(
                f"loss became {float(total.detach())} at epoch {self.epoch + 1}, step {self.step}; the last good "
                "checkpoint is kept. Lower train.weights.lr or set train.grad_clip (e.g. 5.0)"
            )
        with full_precision(self.precision, self.device):
            for name in names:
                self.optimizers[name].zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            for name in names:
                if name in self._synced_apart:
                    average_gradients(self.groups[name], self.context)
            if self.config.grad_clip:
                for name in names:
                    self.scaler.unscale_(self.optimizers[name])
                params = [p for name in names for p in self.groups[name]]
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            for name in names:
                self.scaler.step(self.optimizers[name])
                self.schedulers[name].step()
            self.scaler.update()

    def weight_norm(self) -> float:
        """The L2 norm of all the student's parameters together."""
        with torch.no_grad():
            squares = [p.detach().float().pow(2).sum() for p in self.student.parameters()]
            return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    def check_divergence(self, epoch_loss: float | None = None) -> None:
        """Stop the run (as for a NaN loss) when the weights are no longer finite or their norm
        grew more than :data:`DIVERGENCE_FACTOR` times, or when an epoch's mean loss grew more
        than ``10 * DIVERGENCE_FACTOR`` times the first epoch's of its phase (at least 1): called
        before every checkpoint, so the last checkpoint kept is the last good one."""
        norm = self.weight_norm()
        limit = DIVERGENCE_FACTOR * max(self.reference_norm, 1e-12)
        fix = "the last good checkpoint is kept. Lower train.weights.lr or set train.grad_clip (e.g. 5.0)"
        if not (math.isfinite(norm) and norm <= limit):
            raise TrainingDiverged(
                f"the weights diverged at epoch {self.epoch + 1}, step {self.step}: their norm "
                f"grew from {self.reference_norm:.3g} to {norm:.3g}; {fix}"
            )
        if epoch_loss is None:
            return
        first = self.reference_loss.setdefault(self.phase.name, epoch_loss)
        if epoch_loss > 10 * DIVERGENCE_FACTOR * max(first, 1.0):
            raise TrainingDiverged(
                f"the loss diverged at epoch {self.epoch + 1}: its mean grew from "
                f"{first:.3g} (the phase's first epoch) to {epoch_loss:.3g}; {fix}"
            )

    def to_batch(self, item: Any) -> Batch:
        """A loader's item (:meth:`Batch.of`) as a :class:`Batch` on the training device."""
        batch = Batch.of(item)
        images = batch.images
        if images is not None:
            images = images.to(self.device, non_blocking=True)
            if images.dim() == 4:
                images = images.contiguous(memory_format=self.memory_format)
        labels = None if batch.labels is None else batch.labels.to(self.device, non_blocking=True)
        size = batch.size or (0 if images is None else int(images.shape[0]))
        return Batch(images, labels, batch.index, size)

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One batch through the method's step; returns this rank's loss values."""
        with autocast(self.precision, self.device):
            losses = self.method.training_step(self.models, batch, TrainerStep(self, self.phase))
        self.step += 1
        values = {name: float(value.detach()) for name, value in losses.items()}
        values["loss"] = sum(values.values())
        return values

    def _batches(self) -> Iterator[Any]:
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
        phase = self.phase
        self._enter_phase(phase)
        images_now = 0
        start = time.perf_counter()
        label = f" ({phase.name})" if len(self.phases) > 1 else ""
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}{label}",
            unit="batch",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        )
        batches = self._batches()
        while self.batch_in_epoch < self.steps_per_epoch:
            item = next(batches, None)
            if item is None:
                break
            batch = self.to_batch(item)
            values = self.train_step(batch)
            for name, value in values.items():
                self.epoch_sums[name] = self.epoch_sums.get(name, 0.0) + value
            self.epoch_images += batch.size
            images_now += batch.size
            self.batch_in_epoch += 1
            if self.progress:
                bar.update(1)
                rate = images_now * self.context.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.0f}")
            if self._mid_epoch_checkpoint_due():
                self.check_divergence()
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

    def run_epoch_hooks(self) -> None:
        """Each epoch hook on this epoch's batches, with the method's summed loss; the loader is
        rewound afterwards (``set_epoch``), so training sees the same batches as without them."""
        phase = self.phase

        def loss(network: nn.Module, item: Any) -> Tensor:
            batch = self.to_batch(item)
            return sum(self.method.losses(Models(network, self.teacher), batch, phase).values())

        model = unwrap_model(self.model)
        # a hook only measures: a trainable teacher runs in eval mode, so that its batch-norm
        # statistics do not move on the hook's batches
        teacher_mode = self.teacher.training if self.teacher is not None else False
        if self.teacher is not None:
            self.teacher.eval()
        try:
            for hook in self.epoch_hooks:
                loader = self.train_loader
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(self.epoch)
                model.train()
                hook(epoch=self.epoch, model=model, loss=loss, batches=iter(loader))
        finally:
            if self.teacher is not None:
                self.teacher.train(teacher_mode)

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
            row: dict[str, Any] = {"epoch": self.epoch + 1, "phase": self.phase.name}
            if self.batch_in_epoch == 0 and self.epoch_hooks:
                self.run_epoch_hooks()
            row.update(self.train_epoch())
            self.check_divergence(row.get("train_loss"))
            rates.append(row["images_per_s"])
            for name, optimizer in self.optimizers.items():
                row[f"lr_{name}"] = optimizer.param_groups[0]["lr"]
            if self._evaluates_after(self.epoch + 1):
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

    def _evaluates_after(self, epoch: int) -> bool:
        """Whether the run measures the student after ``epoch`` (1-based): every
        ``train.eval_every`` epochs and always after the last."""
        return epoch % self.config.eval_every == 0 or epoch == self.config.epochs

    def _record(self, row: dict[str, Any]) -> None:
        self.result.history.append(row)
        evaluated = self._evaluates_after(self.epoch)
        if evaluated:
            self.result.last = {k[5:]: v for k, v in row.items() if k.startswith("test_")}
        validation = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
        score = validation.get("top1", self.result.last.get("top1", -row.get("train_loss", 0.0)))
        improved = evaluated and score > self.best_score
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
                save_weights(
                    self.student, self.checkpoint_dir / "best.safetensors", self.weights_metadata
                )

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
        its own ``state_dict`` is saved too, and so is fp16's gradient scale."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "student": self.student.state_dict(),
            **self._trainable_teacher_state(),
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
            "reference_norm": self.reference_norm,
            "reference_loss": dict(self.reference_loss),
            "rng": gather_objects(capture_rng_state(), self.context),
        }
        if hasattr(self.train_loader, "state_dict"):
            state["loader"] = self.train_loader.state_dict()
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def _trainable_teacher_state(self) -> dict[str, Any]:
        """A trainable teacher is part of the run: checkpointed beside the student."""
        if self.method.needs.teacher == "trainable" and self.teacher is not None:
            return {"teacher": self.teacher.state_dict()}
        return {}

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
        if self.method.needs.teacher == "trainable" and self.teacher is not None:
            if "teacher" not in state:
                raise ValueError(
                    "the checkpoint holds no trainable teacher, but this method trains one; "
                    "resume with the method that wrote it"
                )
            self.teacher.load_state_dict(state["teacher"])
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
        self.reference_norm = float(state.get("reference_norm", self.reference_norm))
        self.reference_loss = {str(k): float(v) for k, v in state.get("reference_loss", {}).items()}
        self.result.best_epoch = int(state["best_epoch"])
        self.result.best = dict(state["best"])
        self.result.validation = dict(state.get("validation", {}))
        self.result.history = [dict(row) for row in state.get("history", [])]
        if self.result.history:
            last_row = self.result.history[-1]
            self.result.last = {k[5:]: v for k, v in last_row.items() if k.startswith("test_")}
        if "loader" in state and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["loader"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
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

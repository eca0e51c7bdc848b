"""The training loop shared by every method: epochs, optimizers per parameter group, evaluation,
checkpoints, logs and a progress bar. What a step computes belongs to the method."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..methods.base import Method
from ..quant.layers import model_parameters, quantizer_parameters
from .checkpoint import atomic_torch_save, load_training_checkpoint, save_weights
from .evaluate import evaluate
from .logs import RunLog
from .optim import build_optimizer, build_scheduler


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

    ``train_loader`` yields ``(images, labels or None)`` and has ``set_epoch`` and ``__len__``;
    ``eval_loader``/``val_loader`` yield labeled batches (either may be ``None``).
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
    ) -> None:
        self.student, self.teacher, self.method = student, teacher, method
        self.train_loader, self.eval_loader, self.val_loader = train_loader, eval_loader, val_loader
        self.config, self.device, self.log = config, device, log
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
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
        self.epoch = 0
        self.step = 0
        self.best_score = -math.inf
        self.result = FitResult()
        if teacher is not None:
            teacher.eval()
            for parameter in teacher.parameters():
                parameter.requires_grad_(False)

    # ------------------------------------------------------------------------------- one step
    def train_step(self, images: Tensor, labels: Tensor | None) -> dict[str, float]:
        images = images.to(self.device, non_blocking=True)
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
        output = self.method.training_step(self.student, self.teacher, images, labels)
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

    def train_epoch(self) -> dict[str, float]:
        self.student.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(self.epoch)
        sums: dict[str, float] = {}
        seen = 0
        start = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            unit="batch",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        )
        for index, (images, labels) in enumerate(self.train_loader):
            if index >= self.steps_per_epoch:
                break
            values = self.train_step(images, labels)
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            seen += images.shape[0]
            bar.update(1)
            bar.set_postfix(
                loss=f"{values['loss']:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}"
            )
        bar.close()
        seconds = time.perf_counter() - start
        averages = {f"train_{k}": v / max(self.steps_per_epoch, 1) for k, v in sums.items()}
        averages["images_per_s"] = seen / seconds if seconds > 0 else 0.0
        averages["epoch_seconds"] = seconds
        return averages

    # ------------------------------------------------------------------------------- the run
    def fit(self) -> FitResult:
        start = time.perf_counter()
        rates = []
        while self.epoch < self.config.epochs:
            row: dict[str, Any] = {"epoch": self.epoch + 1}
            row.update(self.train_epoch())
            rates.append(row["images_per_s"])
            for name, optimizer in self.optimizers.items():
                row[f"lr_{name}"] = optimizer.param_groups[0]["lr"]
            if self.val_loader is not None:
                row.update(
                    {
                        f"val_{k}": v
                        for k, v in evaluate(self.student, self.val_loader, self.device).items()
                    }
                )
            if self.eval_loader is not None:
                row.update(
                    {
                        f"test_{k}": v
                        for k, v in evaluate(self.student, self.eval_loader, self.device).items()
                    }
                )
            self.epoch += 1
            self._record(row)
        self.result.seconds = time.perf_counter() - start
        self.result.images_per_second = sum(rates) / len(rates) if rates else 0.0
        return self.result

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
        self.log.metrics(row, self.step)
        summary = ", ".join(
            f"{k} {v:.4g}"
            for k, v in row.items()
            if k != "epoch" and isinstance(v, float) and not k.startswith("lr_")
        )
        self.log.info("epoch %d/%d: %s", self.epoch, self.config.epochs, summary)
        if self.checkpoint_dir is not None:
            if self.epoch % self.config.checkpoint_every == 0 or self.epoch == self.config.epochs:
                atomic_torch_save(self.state_dict(), self.checkpoint_dir / "last.pt")
            if improved:
                save_weights(self.student, self.checkpoint_dir / "best.safetensors")

    # ------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, quantizers, optimizers, schedules,
        RNG states, counters, and the method's own state."""
        return {
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "best_epoch": self.result.best_epoch,
            "best": self.result.best,
            "rng_torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_score = float(state["best_score"])
        self.result.best_epoch = int(state["best_epoch"])
        self.result.best = dict(state["best"])
        torch.set_rng_state(state["rng_torch"])

    def resume(self, path: Path) -> Path:
        state, used = load_training_checkpoint(path)
        self.load_state_dict(state)
        self.log.info("resumed from %s at epoch %d (step %d)", used, self.epoch, self.step)
        return used

"""The training loop, evaluation, checkpoints and logs."""

from .checkpoint import atomic_torch_save, load_training_checkpoint, safe_torch_load, save_weights
from .device import resolve_device, seed_everything
from .evaluate import evaluate
from .logs import RunLog, get_logger, read_metrics, setup_console_logging
from .teacher import teacher_for
from .trainer import EpochHook, FitResult, Trainer, TrainerStep, TrainingDiverged

__all__ = [
    "EpochHook",
    "FitResult",
    "RunLog",
    "Trainer",
    "TrainerStep",
    "TrainingDiverged",
    "atomic_torch_save",
    "evaluate",
    "get_logger",
    "load_training_checkpoint",
    "read_metrics",
    "resolve_device",
    "safe_torch_load",
    "save_weights",
    "seed_everything",
    "setup_console_logging",
    "teacher_for",
]

"""The flow a reader should see, one call per arrow:

config -> method (its needs, read before anything is built)
       -> data (only what the method needs) -> teacher (build + safe load)
       -> student = prepare(copy of teacher, policy) -> teacher_for(the method's role)
       -> method.setup -> calibrate(method.calibration_images) -> Trainer(models, method).fit
       -> evaluate -> weights, summary, plot in the run folder
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as datasets
from . import models
from .config import (
    Config,
    DataConfig,
    MethodConfig,
    StudentConfig,
    dump_config,
    flatten,
    read_yaml,
    resume_conflicts,
    validate_config,
)
from .engine import (
    FitResult,
    RunLog,
    Trainer,
    evaluate,
    resolve_device,
    save_weights,
    seed_everything,
)
from .engine.checkpoint import read_weights_metadata
from .engine.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    evaluate_sharded,
    init_distributed,
    main_process_first,
    per_rank_batch_size,
    run_on_main,
    shutdown_distributed,
)
from .engine.precision import check_precision, describe_precision
from .engine.teacher import teacher_for
from .engine.teacher_cache import CachedTeacher
from .methods import Batch, DataShapes, Method, Models, Needs, build_method
from .quant import (
    calibrate,
    describe,
    prepare,
    quantized_layers,
    quantizer_parameters,
    uses_compiled_kernels,
)
from .quant.kernels import should_compile_kernels
from .quant.methods.ewgs import EWGSDeltaSchedule

#: what shows that a folder holds a run worth keeping (a run that failed before the end of its
#: first epoch has none of these: the next command replaces it without --overwrite)
RUN_MARKERS = ("metrics.csv", "checkpoints", "summary.json", "model.safetensors")
#: what a run and the commands on it write into the run folder (--overwrite removes all of it)
RUN_FILES = (
    "config.yaml", "train.log", "metrics.csv", "checkpoints", "summary.json", "model.safetensors",
    "teacher.safetensors", "curves.png", "tensorboard", "model.onnx", "model.packed.safetensors",
    "generated.png",
)  # fmt: skip


@dataclass
class DataBundle:
    """Decoded data for a run, with what the model needs to know about it."""

    train: datasets.ImageArray
    val: datasets.ImageArray | None
    test: datasets.ImageArray | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None
    in_channels: int
    image_size: tuple[int, int]
    classes: list[str] | None = None


@dataclass
class RunResult:
    """What a run reports: accuracies (percent), speed, sizes, and where its files are."""

    run_dir: str
    method: str
    weight_bits: int | None
    act_bits: int | None
    labels_used: bool
    epochs: int
    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    validation: dict[str, float] = field(default_factory=dict)
    teacher: dict[str, float] = field(default_factory=dict)
    #: the calibrated student before training (post-training quantization, PTQ)
    calibrated: dict[str, float] = field(default_factory=dict)
    teacher_after: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    minutes: float = 0.0
    float_bytes: int = 0
    quantized_bytes: int = 0
    machine: str = field(
        default_factory=lambda: f"{platform.machine()}, {torch.get_num_threads()} threads"
    )


# ----------------------------------------------------------------------------------------- data
def load_data(config: DataConfig, seed: int = 0, need_train: bool = True) -> DataBundle:
    """Decode (or read from cache) the train/test splits and derive normalisation statistics."""
    if config.root is None:
        if not need_train and config.image_size is not None:
            return _shapes_only(config)
        raise ValueError(
            "data.root is not set; point it at your image folder (e.g. data.root=/path/to/cifar10)"
            + ("" if need_train else "; or, with no images at all, set data.image_size, data.mean "
               "and data.std (the teacher's input size and normalisation)")
        )  # fmt: skip

    def read(
        split: str, format: str | None = None, root: Path | None = None
    ) -> datasets.ImageArray:
        return datasets.load_images(
            format or config.format,
            root or config.root,
            split=split,
            resize=config.resize,
            cache_dir=config.cache_dir,
        )

    # the test split may come from elsewhere (e.g. unlabeled training images, a labeled test set)
    test = (
        read(config.test_split, config.test_format, config.test_root) if config.test_split else None
    )
    train = read(config.train_split) if need_train else test
    if train is None:
        raise ValueError(
            "data.test_split is not set and no training split is read; set data.test_split"
        )
    # class names come from the training split (or the run's record of them): every other split
    # is labelled by name, so a split that lacks a class does not shift the others' labels
    classes = config.classes or (train.classes if need_train else None)
    if classes:
        if need_train:
            train = train.with_classes(classes, f"the training split {config.train_split!r}")
        if test is not None:
            test = test.with_classes(classes, f"the test split {config.test_split!r}")
    if test is not None and config.limit_test:
        test = _random_subset(test, config.limit_test, seed)
    if not need_train:
        train = test
    if config.mean is not None and config.std is not None:
        mean, std = tuple(config.mean), tuple(config.std)
    else:
        mean, std = datasets.channel_stats(train)  # from the full training split, before any limit
    if config.limit_train and need_train:
        train = (
            train.stratified_subset(config.limit_train, seed)
            if config.stratified_limit
            else _random_subset(train, config.limit_train, seed)
        )
    val = None
    if config.val_fraction > 0 and need_train:
        train, val = train.split(config.val_fraction, seed)
    num_classes = train.num_classes or (test.num_classes if test is not None else None)
    height, width, channels = train.images.shape[1:4]
    return DataBundle(
        train, val, test, tuple(mean), tuple(std), num_classes, channels, (height, width),
        list(classes) if classes else None,
    )  # fmt: skip


def _shapes_only(config: DataConfig) -> DataBundle:
    """A data-free run with no images at all: the input's shape and normalisation from the
    configuration (channels: one per ``data.mean`` value); nothing to evaluate on."""
    if config.mean is None or config.std is None:
        raise ValueError(
            "a run without data.root needs the teacher's normalisation to record for export and "
            "evaluation: set data.mean and data.std (the values the teacher was trained with)"
        )
    if len(config.mean) != len(config.std):
        raise ValueError(
            f"data.mean has {len(config.mean)} values and data.std {len(config.std)}; give one "
            "per input channel in each"
        )
    height, width = config.image_size or (0, 0)
    channels = len(config.mean)
    empty = datasets.ImageArray(np.zeros((0, height, width, channels), dtype=np.uint8))
    return DataBundle(
        empty, None, None, tuple(config.mean), tuple(config.std), None, channels,
        (height, width), config.classes,
    )  # fmt: skip


def _random_subset(images: datasets.ImageArray, count: int, seed: int) -> datasets.ImageArray:
    """``count`` images drawn without replacement (class folders are sorted: never take the head)."""
    if count >= len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images.subset(order.sort().values.tolist())


def make_loaders(
    bundle: DataBundle,
    config: Config,
    device: torch.device,
    needs: Needs,
    shard: tuple[int, int] | None = None,
) -> tuple[Any, Any, Any]:
    """Training loader (augmented; labels and sample indices only if the method reads them; for
    a data-free method, batches that carry only their size) and evaluation loaders.

    With ``shard=(rank, world_size)`` (multi-process runs) the training loader gives this rank
    ``data.batch_size / world_size`` images of every global batch, and the evaluation loaders a
    disjoint part (every world_size-th image) of their split."""
    data = config.data
    rank, world_size = shard or (0, 1)
    batch_size = per_rank_batch_size(
        data.batch_size, DistributedContext(rank=rank, world_size=world_size)
    )
    if needs.data == "none":
        steps = config.train.max_steps_per_epoch
        if steps is None:
            raise ValueError(
                "a data-free method has no training set to count batches by; set "
                "train.max_steps_per_epoch (e.g. 200)"
            )
        train: Any = datasets.SizeOnlyBatches(batch_size, steps)
    else:
        if needs.labels and bundle.train.labels is None:
            fix = needs.label_free_setting or "method.name=sqakd"
            raise ValueError(
                "this method reads labels but the training images have none; give labeled data "
                f"(class folders) or set {fix} (label-free)"
            )
        augment = datasets.BatchAugment(
            pad=data.augment.crop_padding, flip=data.augment.flip, mean=bundle.mean, std=bundle.std
        )
        train = datasets.BatchLoader(
            bundle.train,
            batch_size,
            shuffle=True,
            augment=augment,
            drop_last=True,
            seed=config.run.seed,
            device=device,
            with_labels=needs.labels,
            shard=shard,
            with_index=needs.sample_index,
            prefetch=data.prefetch_batches,
        )
    if len(train) == 0:
        raise ValueError(
            f"{len(bundle.train)} training images are fewer than one batch of {data.batch_size}; "
            "lower data.batch_size"
        )

    def evaluation(part: datasets.ImageArray | None) -> Any:
        if part is None:
            return None
        require_labels(part)
        if world_size > 1:
            part = part.subset(list(range(rank, len(part), world_size)))
        return datasets.BatchLoader(
            part,
            data.eval_batch_size,
            shuffle=False,
            mean=bundle.mean,
            std=bundle.std,
            device=device,
        )

    return train, evaluation(bundle.val), evaluation(bundle.test)


# --------------------------------------------------------------------------------------- models
def build_network(config: Config, bundle: DataBundle, student: bool = False) -> nn.Module:
    """The configured architecture (``model``), or with ``student=True`` the student's own when
    ``student.name`` sets one, for the data's classes and channels."""
    num_classes = config.model.num_classes or bundle.num_classes
    if num_classes is None:
        raise ValueError("the data has no labels to count classes; set model.num_classes")
    if (
        config.model.num_classes
        and bundle.num_classes
        and config.model.num_classes != bundle.num_classes
    ):
        raise ValueError(
            f"model.num_classes is {config.model.num_classes} but the data has {bundle.num_classes} classes; "
            "remove model.num_classes or use matching data"
        )
    in_channels = config.model.in_channels or bundle.in_channels
    name, kwargs = config.model.name, config.model.kwargs
    if student and config.student.name is not None:
        name, kwargs = config.student.name, config.student.kwargs
    return models.build_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def load_teacher(
    config: Config,
    bundle: DataBundle,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """The full-precision teacher: the configured architecture with the checkpoint's weights."""
    if config.teacher.checkpoint is None:
        raise ValueError(
            "this method needs a full-precision teacher; set teacher.checkpoint (train one with `sqakd train`)"
        )
    path = Path(config.teacher.checkpoint)
    if path.is_dir():
        raise ValueError(
            f"teacher.checkpoint {path} is a folder; give the weights file in it "
            f"(e.g. {path / 'model.safetensors'})"
        )
    teacher = build_network(config, bundle)
    state = models.read_state_dict(path)  # unreadable or truncated: its own message
    broken = [
        key
        for key, tensor in state.items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if broken:
        raise ValueError(
            f"teacher checkpoint {path} holds NaN or infinite values in {len(broken)} tensor(s) "
            f"(e.g. {', '.join(broken[:3])}); the teacher diverged: train it again"
        )
    try:
        models.load_weights(
            teacher, state, key_map=config.teacher.key_map, match=config.teacher.match, log=log
        )
    except ValueError as error:
        raise ValueError(
            f"teacher checkpoint {config.teacher.checkpoint} does not fit model {config.model.name!r} with "
            f"{bundle.num_classes} classes (teacher/student class-count or architecture mismatch): {error}"
        ) from None
    return teacher.to(device).eval()


# ------------------------------------------------------------------------------------ run folder
def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run that trained (at least one epoch, or its results)."""
    return folder.is_dir() and any((folder / marker).exists() for marker in RUN_MARKERS)


def check_run_folder(config: Config, resume: bool = False) -> None:
    """Everything about the run folder that can be refused, without touching it: an earlier run
    without --overwrite or --resume; --resume with nothing to resume, or with settings that would
    train something else than the saved config.yaml (the differing keys are listed)."""
    folder = Path(config.run.output)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"run.output {folder} is a file, not a folder; choose another run.output")
    if resume:
        saved_path = folder / "config.yaml"
        if not saved_path.is_file():
            raise ValueError(
                f"nothing to resume in {folder} (it holds no run: no config.yaml); "
                "run the same command without --resume to start one"
            )
        saved = read_yaml(saved_path.read_text(errors="replace"), f"the run's {saved_path}")
        try:
            earlier = validate_config(saved or {})
        except ValueError as error:
            raise ValueError(f"the run's {saved_path} cannot be resumed: {error}") from None
        conflicts = resume_conflicts(earlier, config)
        if conflicts:
            raise ValueError(
                f"--resume would train something other than the run in {folder}: "
                f"{'; '.join(conflicts)}; resume with the run's settings (its config.yaml), "
                "or start a new run (another run.output, or --overwrite)"
            )
        return
    if holds_run(folder) and not config.run.overwrite:
        raise ValueError(
            f"run folder {folder} already holds a run; pass --overwrite to replace it, --resume "
            "to continue it, or choose another run.output"
        )


def remove_run_files(folder: Path) -> None:
    """Delete what an earlier run wrote into ``folder`` (:data:`RUN_FILES`, any ``.onnx`` and
    unfinished ``.tmp`` files); other files are left where they are."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        name = entry.name
        if name in RUN_FILES or name.endswith((".onnx", ".tmp")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def prepare_run_folder(config: Config, resume: bool = False) -> Path:
    """Create the run folder once everything else was checked: on --resume keep it as it is
    (``config.yaml`` is written once, never rewritten); otherwise remove an earlier run's files
    completely (--overwrite, or a run that failed before its first epoch ended) and write
    ``config.yaml``."""
    check_run_folder(config, resume)
    folder = Path(config.run.output)
    if resume:
        return folder
    remove_run_files(folder)
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / ".config.yaml.tmp"
    temp.write_text(dump_config(config))
    temp.replace(folder / "config.yaml")
    return folder


def _setup(config: Config, device: str | None = None) -> torch.device:
    seed_everything(config.run.seed, config.run.deterministic)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    return resolve_device(device or config.run.device)


# ------------------------------------------------------------------------------------- the jobs
def train_teacher(config: Config, resume: bool = False) -> RunResult:
    """Train a full-precision model with labels (``sqakd train``)."""
    update = {"method": MethodConfig(name="supervised"), "student": StudentConfig()}
    config = config.model_copy(update=update)  # the teacher's own architecture
    return run(config, resume=resume)


def quantize(config: Config, resume: bool = False) -> RunResult:
    """Quantization-aware training of a copy of the teacher with the configured method."""
    return run(config, resume=resume)


def run(config: Config, resume: bool = False) -> RunResult:
    """Build everything the config names, train, evaluate, and write the run folder.

    Under ``torchrun`` every process runs this with its rank (see ``sqakd.engine.distributed``):
    rank 0 decodes the data first (filling the cache) and alone writes the run folder."""
    context, device_name = init_distributed(config.run.device)
    try:
        run_on_main(lambda: check_run_folder(config, resume), context)  # before any work
        device = _setup(config, device_name)
        check_precision(config.run.precision, device)  # run.device auto: known only now
        method = build_method(config.method)
        with main_process_first(context):
            bundle = load_data(
                config.data, config.run.seed, need_train=method.needs.data == "train"
            )
        # record the normalisation and class names in the run's config.yaml so that eval and
        # export reuse them exactly
        recorded = {"mean": bundle.mean, "std": bundle.std, "classes": bundle.classes}
        config = config.model_copy(update={"data": config.data.model_copy(update=recorded)})
        run_on_main(lambda: check_run_folder(config, resume), context)
        # the folder is created (and train.log written) only once everything is built and checked
        log = RunLog(
            Path(config.run.output), config.run.tensorboard, enabled=context.is_main, defer=True
        )
        if not context.is_main:
            log.logger.setLevel("WARNING")
        try:
            return _run(config, method, bundle, log, device, resume, context)
        finally:
            log.close()
    finally:
        if context.enabled:
            shutdown_distributed()


def _run(
    config: Config,
    method: Method,
    bundle: DataBundle,
    log: RunLog,
    device: torch.device,
    resume: bool,
    context: DistributedContext = SINGLE_PROCESS,
) -> RunResult:
    needs = method.needs
    if config.train.epochs == 0 and not needs.quantized_student:
        raise ValueError(
            f"train.epochs=0 calibrates and evaluates a quantized student (PTQ); method "
            f"{config.method.name!r} does not quantize: set train.epochs to 1 or more"
        )
    shard = (context.rank, context.world_size) if context.enabled else None
    train_loader, val_loader, test_loader = make_loaders(bundle, config, device, needs, shard)
    # every rank calibrates on the same global first batch (then rank 0's state is broadcast)
    unsharded = replace(needs, labels=False, sample_index=False)
    calibration_loader = (
        make_loaders(bundle, config, device, unsharded)[0] if shard else train_loader
    )
    teacher = (
        load_teacher(config, bundle, device, log.info)
        if needs.teacher != "none" or config.teacher.checkpoint
        else None
    )
    teacher_metrics = (
        evaluate_sharded(teacher, test_loader, device, context)
        if teacher is not None and test_loader
        else {}
    )
    if teacher_metrics:
        log.info(
            "teacher: top-1 %.2f %%, top-5 %.2f %% (inputs normalised with mean %s, std %s; a "
            "teacher trained with other statistics loses accuracy: set data.mean/data.std)",
            teacher_metrics["top1"],
            teacher_metrics["top5"],
            _rounded(bundle.mean),
            _rounded(bundle.std),
        )
    with log.capture_warnings():  # prepare's notes (layers kept float, observers) to the log
        student = build_student(config, needs, bundle, teacher, device)
    models = Models(student, role_teacher(teacher, needs, bundle, config, device, log))
    method.setup(models, data_shapes(config, bundle, needs))
    if needs.quantized_student:
        log.info("quantization plan:\n%s", describe(student))
        log.info(
            "quantizer kernels: %s (run.compile: %s)",
            "compiled" if uses_compiled_kernels(student) else "eager",
            config.run.compile,
        )
        with log.capture_warnings():  # e.g. layers whose grid turns negative inputs into 0
            calibrate(
                student,
                method.calibration_images(as_batches(calibration_loader)),
                config.train.calibration_batches,
            )
    calibrated = (
        evaluate_sharded(student, test_loader, device, context)
        if needs.quantized_student and test_loader
        else {}
    )
    if calibrated:
        log.info(
            "calibrated student before training (PTQ, %d calibration batch(es), observer %s): "
            "top-1 %.2f %%, top-5 %.2f %%",
            config.train.calibration_batches,
            config.quant.observer,
            calibrated["top1"],
            calibrated["top5"],
        )
    log.info(
        "method %s, %s, %d epochs, %d steps per epoch, device %s, %s",
        config.method.name,
        "data-free (no training images read)"
        if needs.data == "none"
        else f"{len(bundle.train)} training images "
        f"({'labels used' if needs.labels else 'no labels read'})",
        config.train.epochs,
        len(train_loader),
        device,
        describe_precision(config.run.precision),
    )
    folder = run_on_main(lambda: prepare_run_folder(config, resume), context)
    log.open()
    trainer = Trainer(
        student,
        models.teacher,
        method,
        train_loader,
        config.train,
        device,
        log,
        eval_loader=test_loader,
        val_loader=val_loader,
        checkpoint_dir=folder / "checkpoints",
        progress=config.run.progress,
        distributed=context,
        sync_batchnorm=config.run.sync_batchnorm,
        channels_last=config.run.channels_last,
        epoch_hooks=quantizer_hooks(config),
        weights_metadata=weights_metadata(config, needs),
        precision=config.run.precision,
    )
    last_checkpoint = folder / "checkpoints" / "last.pt"
    if resume and (last_checkpoint.exists() or last_checkpoint.with_name("last.pt.prev").exists()):
        trainer.resume(last_checkpoint)
    elif resume:
        log.info(
            "no checkpoint in %s yet (stopped in its first epoch): starting at epoch 1", folder
        )
    fit = trainer.fit() if config.train.epochs else FitResult(calibrated, dict(calibrated))
    result = _result(config, method, fit, teacher_metrics, student, folder)
    result.calibrated = calibrated
    trained_teacher = models.teacher if needs.teacher == "trainable" else None
    if trained_teacher is not None and test_loader:
        result.teacher_after = evaluate_sharded(trained_teacher, test_loader, device, context)
        log.info(
            "teacher after training: top-1 %.2f %% (before: %.2f %%)",
            result.teacher_after["top1"],
            teacher_metrics.get("top1", float("nan")),
        )
    if context.is_main:  # one writer for the run folder
        save_weights(student, folder / "model.safetensors", weights_metadata(config, needs))
        if trained_teacher is not None:
            save_weights(trained_teacher, folder / "teacher.safetensors")
        (folder / "summary.json").write_text(json.dumps(asdict(result), indent=2))
        plot_history(
            fit.history, folder / "curves.png", title=f"{config.method.name} {_bits_label(result)}"
        )
    if "top1" in fit.last:
        log.info(
            "done: last top-1 %.2f %%, best top-1 %.2f %% (epoch %d); files in %s",
            fit.last["top1"], fit.best.get("top1", float("nan")), fit.best_epoch, folder,
        )  # fmt: skip
    else:
        log.info(
            "done: no test images, so no accuracy (set data.root to evaluate, or run `sqakd eval "
            "--run %s -s data.root=DIR`); files in %s", folder, folder,
        )  # fmt: skip
    return result


def _rounded(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def as_batches(loader: Iterable[Any]) -> Iterator[Batch]:
    """A training loader's items as :class:`~sqakd.methods.Batch` (:meth:`Batch.of`)."""
    return (Batch.of(item) for item in loader)


def data_shapes(config: Config, bundle: DataBundle, needs: Needs) -> DataShapes:
    """What a method may size its own modules by."""
    height, width = bundle.image_size
    return DataShapes(
        image_shape=(bundle.in_channels, height, width),
        num_classes=int(config.model.num_classes or bundle.num_classes or 0),
        train_size=len(bundle.train) if needs.data == "train" else 0,
        model_name=config.model.name,
        student_model_name=config.student.name or config.model.name,
    )


def quantizer_hooks(config: Config) -> list[Any]:
    """Epoch hooks the quantizers ask for: EWGS's delta update (train.ewgs_delta_every_epochs)."""
    every = config.train.ewgs_delta_every_epochs
    return [EWGSDeltaSchedule(every, config.train.ewgs_delta_batches)] if every else []


def role_teacher(
    teacher: nn.Module | None,
    needs: Needs,
    bundle: DataBundle,
    config: Config,
    device: torch.device,
    log: RunLog,
) -> nn.Module | None:
    """The teacher prepared for the method's declared role (:func:`teacher_for`): for a
    logits-only teacher, its logits computed once per training image when no random
    augmentation changes the images between epochs (``teacher.cache_outputs``)."""
    if teacher is None or needs.teacher == "none":
        return teacher_for(needs.teacher, teacher)
    augment = config.data.augment
    random_augmentation = augment.crop_padding > 0 or augment.flip
    cache = config.teacher.cache_outputs
    if cache and random_augmentation:
        raise ValueError(
            "teacher.cache_outputs needs images that repeat every epoch; turn augmentation off "
            "(data.augment.crop_padding=0, data.augment.flip=false) or unset teacher.cache_outputs"
        )
    automatic = cache is None and needs.teacher == "logits" and needs.data == "train"
    images = None
    if cache or (automatic and not random_augmentation):
        loader = ordered_loader(bundle.train, bundle, config, device, with_labels=False)
        images = (batch_images for batch_images, _ in loader)
    prepared = teacher_for(needs.teacher, teacher, images, config.run.channels_last)
    if isinstance(prepared, CachedTeacher):
        log.info(
            "teacher logits of %d training images computed once (no augmentation)",
            len(prepared.table),
        )
    return prepared


def build_student(
    config: Config,
    needs: Needs,
    bundle: DataBundle,
    teacher: nn.Module | None,
    device: torch.device,
) -> nn.Module:
    """A copy of the teacher, or a fresh network (no teacher, or ``student.name`` set: the
    student's own architecture from random initialisation), prepared with the quant policy when
    the method quantizes."""
    if teacher is not None and config.student.name is None:
        base = copy.deepcopy(teacher)
        base.requires_grad_(True)
    else:
        base = build_network(config, bundle, student=True).to(device)
    if not needs.quantized_student:
        return base.train()
    compiled = should_compile_kernels(config.run.compile, device)
    return prepare(base, config.quant, compiled_kernels=compiled).to(device).train()


def _bits_label(result: RunResult) -> str:
    if result.weight_bits is None:
        return "float"
    return f"W{result.weight_bits}A{result.act_bits}"


def _result(
    config: Config,
    method: Method,
    fit: FitResult,
    teacher_metrics: dict[str, float],
    student: nn.Module,
    folder: Path,
) -> RunResult:
    quantized = method.needs.quantized_student
    float_bytes, quantized_bytes = weight_storage_bytes(student)
    return RunResult(
        run_dir=str(folder),
        method=config.method.name,
        weight_bits=config.quant.weight_bits if quantized else None,
        act_bits=config.quant.act_bits if quantized else None,
        labels_used=method.needs.labels,
        epochs=config.train.epochs,
        last=fit.last,
        best=fit.best,
        best_epoch=fit.best_epoch,
        validation=fit.validation,
        teacher=teacher_metrics,
        images_per_second=fit.images_per_second,
        minutes=fit.seconds / 60,
        float_bytes=float_bytes,
        quantized_bytes=quantized_bytes,
    )


def weight_storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the parameters as float32, bytes with each quantized weight at its bit-width).
    Quantizer parameters (a few scalars per layer) are counted in neither."""
    quantizer_owned = {id(p) for p in quantizer_parameters(model)}
    float_bytes = sum(p.numel() * 4 for p in model.parameters() if id(p) not in quantizer_owned)
    saved_bits = sum(
        layer.weight.numel() * (32 - layer.weight_quantizer.bits)
        for _, layer in quantized_layers(model)
        if layer.weight_quantizer is not None
    )
    return float_bytes, float_bytes - saved_bits // 8


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss and test/validation top-1 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot(epochs, [row.get("train_loss", float("nan")) for row in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("test_top1", "test"), ("val_top1", "validation")):
        if any(key in row for row in history):
            accuracy_axis.plot(
                epochs, [row.get(key, float("nan")) for row in history], marker="o", label=label
            )
    accuracy_axis.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    if accuracy_axis.lines:
        accuracy_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def load_trained_model(
    config: Config, weights: Path | None = None, key_map: Mapping[str, str] | None = None
) -> tuple[nn.Module, DataBundle, torch.device]:
    """The network a run trained (float, or prepared with ``config.quant`` when the weights hold
    quantizer state) with its weights loaded without executing code, its data (test split, for
    the image size and normalisation) and the device. Used by ``sqakd eval``, ``export`` and
    ``verify``. ``key_map`` renames the keys of ``weights`` as ``teacher.key_map`` does a
    teacher's (``{"linear.": "fc."}``; an entry that matches no key is an error); without
    ``weights``, the teacher checkpoint loads with ``teacher.match`` and ``key_map``, by default
    ``teacher.key_map``."""
    device = _setup(config)
    bundle = load_data(config.data, config.run.seed, need_train=config.data.mean is None)
    network = build_network(config, bundle, student=weights is not None)  # else: the teacher
    path = weights or config.teacher.checkpoint
    if path is None:
        raise ValueError(
            "give the weights to load: --weights path (model.safetensors or a checkpoint) or "
            "--run RUN_FOLDER"
        )
    if Path(path).is_dir():
        raise ValueError(
            f"{path} is a folder; give the weights file in it (model.safetensors), or the folder "
            "with --run"
        )
    state = models.read_state_dict(path)
    if any(key.endswith("_quantizer.initialized") for key in state):
        check_quant_plan(path, config)
        compiled = should_compile_kernels(config.run.compile, device)
        network = prepare(network, config.quant, compiled_kernels=compiled)
    if weights is None:
        key_map, match = key_map or config.teacher.key_map, config.teacher.match
        source = f"teacher.checkpoint {path}"
    else:
        match, source = "names", f"weights {path}"
    models.load_weights(network, state, key_map=key_map, match=match, source=source)
    return network.to(device).eval(), bundle, device


#: the safetensors metadata key under which a run's weights record their quantization plan
QUANT_PLAN_KEY = "sqakd.quant"
#: plan keys that only choose where the ranges start (calibration), not what weights compute
INITIALISATION_KEYS = {"quant.observer", "quant.observer_percentile"}


def weights_metadata(config: Config, needs: Needs) -> dict[str, str]:
    """What saved weights record about how to rebuild them: the quantization plan."""
    if not needs.quantized_student:
        return {}
    return {QUANT_PLAN_KEY: json.dumps(config.quant.model_dump(mode="json"), sort_keys=True)}


def check_quant_plan(path: str | Path, config: Config) -> None:
    """Refuse to load weights under a quantization plan other than the one they were trained
    with (W4A4 weights under a W2A2 config would silently compute another model)."""
    recorded = read_weights_metadata(path).get(QUANT_PLAN_KEY)
    if recorded is None:  # weights saved before plans were recorded, or by another tool
        return
    saved = flatten(json.loads(recorded), "quant.")
    wanted = flatten(config.quant.model_dump(mode="json"), "quant.")
    differences = [
        f"{key}: {saved[key]!r} in the weights, {wanted[key]!r} in the config"
        for key in sorted(set(saved) & set(wanted) - INITIALISATION_KEYS)
        if saved[key] != wanted[key]
    ]
    if differences:
        raise ValueError(
            f"the weights {path} were trained with another quantization plan than the config "
            f"gives ({'; '.join(differences)}); use the run's config.yaml (--run) or set those "
            "quant keys to the weights' values"
        )


def evaluation_loader(bundle: DataBundle, config: Config, device: torch.device) -> Any:
    """The labeled test split, normalised like training, in evaluation batches."""
    if bundle.test is None:
        raise ValueError("this needs a labeled test split; set data.test_split")
    require_labels(bundle.test)
    return ordered_loader(bundle.test, bundle, config, device)


def require_labels(part: datasets.ImageArray) -> None:
    """Evaluation scores predictions against labels: refuse an unlabeled test split clearly."""
    if part.labels is None:
        raise ValueError(
            "the test split has no labels to score the model against; point data.test_split "
            "(or data.test_root, data.test_format) at labeled images, e.g. class folders, or "
            "set data.test_split=null to train without testing"
        )


def ordered_loader(
    part: datasets.ImageArray,
    bundle: DataBundle,
    config: Config,
    device: torch.device,
    with_labels: bool = True,
) -> Any:
    """``part`` in file order, normalised like training, no augmentation, evaluation batches."""
    return datasets.BatchLoader(
        part,
        config.data.eval_batch_size,
        shuffle=False,
        mean=bundle.mean,
        std=bundle.std,
        device=device,
        with_labels=with_labels,
    )


def evaluate_model(
    config: Config, weights: Path | None = None, key_map: Mapping[str, str] | None = None
) -> dict[str, float]:
    """Accuracy of a float or quantized model (``sqakd eval``): the config's architecture and
    policy, with weights from ``weights`` (a run's model.safetensors or a teacher checkpoint),
    their keys renamed by ``key_map`` (see :func:`load_trained_model`)."""
    network, bundle, device = load_trained_model(config, weights, key_map)
    return evaluate(network, evaluation_loader(bundle, config, device), device)

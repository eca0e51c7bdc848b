"""Zero-shot QAT with a generator: AKT (Hong et al., ACM SAC 2025), and its baselines AdaDFQ
(Qian et al., CVPR 2023) and GDFQ (Xu et al., ECCV 2020). No training image is read: a
class-conditional generator (:class:`sqakd.zeroshot.ConditionalGenerator`) makes every batch
from the teacher alone.

Each step, on one generated batch ``x = G(z, y)`` (``y`` uniform labels):

1. generator update (group ``generator``), gradients through the teacher and the (STE) student:

   - ``adadfq`` (AKT's, default): ``margin * L_h + 0.2 CE(t - s, y) + 0.1 CE(t + s, y)
     + 1 * BNS``;
   - ``gdfq``: ``CE(t, y) + 0.1 * BNS``;

2. student update (groups ``weights`` and ``quantizers``) on the same images, detached:
   ``logit term + 1000 * RFD (+ label_weight * CE(s, y))``, where the logit term is AdaDFQ's
   ``-T^2 * mean entropy(softmax((t - s) / T))`` (T = 20, default) or the KL of Hinton et al.,
   and RFD (:class:`sqakd.distill.RefinedFeatureDistillation`) matches channel and spatial
   attention of tapped maps. The teacher's logits and maps are the generator step's, detached:
   the same images, one teacher forward per step.

Taps (``method.layers``): ``blocks`` (default) = every residual body's output before the
shortcut is added (:func:`sqakd.models.residual_bodies`: ``layerX.Y.bn2`` in the CIFAR ResNets,
whose ``bn2`` output is exactly the body's pre-addition tensor); a model without residual blocks
falls back to its registered stage names; or ``stages``, or a list of module names.

Schedule: ``warmup_epochs`` (4, as released) train only the generator (phase ``warmup``), while
the student's activation ranges (quantizers with ``freeze``: ``minmax``) keep tracking the
generated batches; from the first student epoch they are frozen. The student's batch norms run
in eval mode with the teacher's running statistics (their affine parameters train): set at the
start of every step, since the trainer puts the whole student in train mode each epoch.

Where the released AKT code and the paper's intent differ, this implements the intent: RFD is
computed (the released code never runs its teacher for it, so its RFD is always 0), and no batch
size is hard-coded. Defaults are the released values: RFD summed over layers and batch with
weight 1000 and T_fd = 8; the paper's mean over layers (``layer_reduction: mean``) and its alpha
mix (``alpha``: ``alpha * RFD + (1 - alpha) * logit term``) are options. During warm-up the
student's losses are computed but not stepped (logged, so that every phase has the same
columns), and the activation ranges see each batch twice, as in the released code.

``akt``, ``adadfq`` (AKT without RFD) and ``gdfq`` are one class with different defaults.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..distill import FeatureTaps, RefinedFeatureDistillation, kd_kl_divergence
from ..distill.taps import unwrap
from ..models import residual_bodies, resolve_tap_names
from ..quant import quantizers
from ..zeroshot import (
    BatchNormStatistics,
    ConditionalGenerator,
    agreement_loss,
    batchnorm_layers,
    disagreement_loss,
    margin_loss,
    softened_difference_entropy,
)
from .base import (
    Batch,
    DataShapes,
    Method,
    Models,
    Needs,
    Phase,
    Step,
    register_method,
    student_groups,
)

if TYPE_CHECKING:
    from ..config import OptimizerConfig

GENERATOR = "generator"
WARMUP = "warmup"
log = logging.getLogger(__name__)  # a child of the run's logger: its lines reach train.log


class AKTOptions(BaseModel):
    """AKT's keys under ``method:`` (defaults: the released AKT code)."""

    model_config = ConfigDict(extra="forbid")

    # the generator and its loss
    generator_loss: Literal["adadfq", "gdfq"] = "adadfq"
    bns_weight: float = Field(1.0, ge=0)
    disagreement_weight: float = Field(0.2, ge=0)
    agreement_weight: float = Field(0.1, ge=0)
    margin_weight: float = Field(1.0, ge=0)
    margin_low: float = Field(0.1, ge=0, le=1)
    margin_high: float = Field(0.8, ge=0, le=1)
    generator_ce_weight: float = Field(1.0, ge=0)  # gdfq: CE(t, y)
    latent_size: int = Field(100, ge=1)
    warmup_epochs: int = Field(4, ge=0)
    # the student's loss
    logit_loss: Literal["entropy", "kl"] = "entropy"
    temperature: float = Field(20.0, gt=0)
    logit_weight: float = Field(1.0, ge=0)
    label_weight: float = Field(0.0, ge=0)  # CE(s, y) with the generated labels (gdfq: 1)
    rfd_weight: float = Field(1000.0, ge=0)
    rfd_temperature: float = Field(8.0, gt=0)
    layers: Literal["blocks", "stages"] | list[str] = "blocks"
    layer_reduction: Literal["sum", "mean"] = "sum"
    batch_reduction: Literal["sum", "mean"] = "sum"
    alpha: float | None = Field(None, ge=0, le=1)  # the paper's mix; None: no mix (released)
    # the student while it trains
    student_batchnorm: Literal["eval", "train"] = "eval"
    freeze_ranges_after_warmup: bool = True

    @model_validator(mode="after")
    def _margins(self) -> AKTOptions:
        if self.margin_low > self.margin_high:
            raise ValueError(
                f"margin_low ({self.margin_low}) must not exceed margin_high ({self.margin_high})"
            )
        return self


class AdaDFQOptions(AKTOptions):
    """AdaDFQ: AKT without RFD."""

    rfd_weight: float = Field(0.0, ge=0)


class GDFQOptions(AKTOptions):
    """GDFQ: CE(t, y) + 0.1 BNS for the generator; KL (T = 20) + CE(s, y) for the student."""

    generator_loss: Literal["adadfq", "gdfq"] = "gdfq"
    bns_weight: float = Field(0.1, ge=0)
    logit_loss: Literal["entropy", "kl"] = "kl"
    label_weight: float = Field(1.0, ge=0)
    rfd_weight: float = Field(0.0, ge=0)


@register_method("akt")
class AKT(Method):
    label = "AKT (data-free)"
    name: ClassVar[str] = "akt"  # the registered name, for error messages
    Options = AKTOptions
    options: AKTOptions
    needs = Needs(teacher="features", data="none")

    # ------------------------------------------------------------------------ building
    def setup(self, models: Models, shapes: DataShapes) -> None:
        cfg = self.options
        teacher = models.teacher
        assert teacher is not None
        name = self.name
        if cfg.bns_weight > 0 and not batchnorm_layers(teacher):
            raise ValueError(
                f"method {name!r} matches generated images to the running statistics of the "
                f"teacher's batch norms (BNS), and {type(teacher).__name__} has no BatchNorm2d "
                "layer: use a teacher with batch norms, or set method.bns_weight=0"
            )
        try:
            self.generator = ConditionalGenerator(
                shapes.image_shape, shapes.num_classes, cfg.latent_size
            )
        except ValueError as error:
            raise ValueError(f"method {name!r}: {error}") from None
        device = next(teacher.parameters()).device
        self.generator.to(device)
        self.statistics = BatchNormStatistics(teacher) if cfg.bns_weight > 0 else None
        self.taps: list[str] = []
        if cfg.rfd_weight > 0:
            self.taps = self._tap_names(teacher, shapes.model_name)
            self.student_taps = FeatureTaps(models.student, self.taps)
            self.teacher_taps = FeatureTaps(teacher, self.taps)
        self.rfd = RefinedFeatureDistillation(
            cfg.rfd_temperature, cfg.layer_reduction, cfg.batch_reduction
        )
        with torch.no_grad():  # the teacher takes the generator's images, or say why not
            probe = torch.zeros(2, *shapes.image_shape, device=device)
            try:
                logits = teacher(probe)
            except RuntimeError as error:
                first = str(error).splitlines()[0]
                raise ValueError(
                    f"method {name!r}: the teacher cannot take generated images of shape "
                    f"{tuple(shapes.image_shape)} ({first}); give data of the size it was "
                    "trained on (data.resize)"
                ) from None
        if logits.dim() != 2 or logits.shape[1] != shapes.num_classes:
            raise ValueError(
                f"method {name!r}: the teacher's output has shape {tuple(logits.shape)}, not "
                f"[batch, {shapes.num_classes}] logits"
            )
        log.info(
            "%s: generator of %s images for %d classes; RFD taps: %s",
            name,
            "x".join(str(n) for n in shapes.image_shape),
            shapes.num_classes,
            ", ".join(self.taps) or "none",
        )

    def _tap_names(self, teacher: nn.Module, model_name: str) -> list[str]:
        spec = self.options.layers
        if spec == "blocks":
            bodies = residual_bodies(teacher)
            if bodies:
                return bodies
            spec = "stages"  # no residual blocks: the registered stage outputs
        return resolve_tap_names(spec, model_name)

    def parameter_groups(self, models: Models) -> dict[str, list[nn.Parameter]]:
        return {**student_groups(models.student), GENERATOR: list(self.generator.parameters())}

    def optimizer_settings(self, group: str, default: OptimizerConfig) -> OptimizerConfig:
        """The generator: Adam, lr 1e-3, betas (0.5, 0.999), no weight decay (as released), on
        the student's schedule."""
        if group != GENERATOR:
            return default
        update = {"name": "adam", "lr": 1e-3, "betas": (0.5, 0.999), "weight_decay": 0.0}
        return default.model_copy(update=update)

    def phases(self, epochs: int) -> list[Phase]:
        warmup = self.options.warmup_epochs
        if warmup == 0:
            return [Phase("train", epochs)]
        if warmup >= epochs:
            raise ValueError(
                f"method.warmup_epochs is {warmup}, which leaves no epoch of train.epochs = "
                f"{epochs} to train the student; raise train.epochs or lower method.warmup_epochs"
            )
        return [Phase(WARMUP, warmup, trains=(GENERATOR,)), Phase("train", epochs - warmup)]

    def calibration_images(self, batches: Iterable[Batch]) -> Iterator[Tensor]:
        for batch in batches:
            with torch.no_grad():  # never yield inside it: the caller may stop consuming
                images = self.generator.generate(batch.size)[0]
            yield images

    # ------------------------------------------------------------------------ the step
    def enter_phase(self, models: Models, phase: Phase) -> None:
        self.prepare_student(models.student, phase)

    def training_step(self, models: Models, batch: Batch, step: Step) -> dict[str, Tensor]:
        images, labels = self.generator.generate(batch.size)
        teacher_logits = models.teacher(images)  # the BNS hooks and the teacher taps fire
        teacher_maps = (
            {k: v.detach() for k, v in self.teacher_taps.features.items()} if self.taps else {}
        )
        generator_losses = self.generator_losses(teacher_logits, models.student(images), labels)
        step.update(generator_losses, groups=(GENERATOR,))
        warmup = not trains_student(step.phase)
        with torch.set_grad_enabled(not warmup):
            logits = models.student(images.detach())
            student_losses = self.student_losses(
                logits, teacher_logits.detach(), labels, teacher_maps
            )
        if not warmup:
            step.update(student_losses, groups=("weights", "quantizers"))
        # in warm-up the student's losses are only measured (and its activation ranges see the
        # batch a second time, as released): every phase logs the same columns
        return {**generator_losses, **student_losses}

    def losses(self, models: Models, batch: Batch, phase: Phase) -> dict[str, Tensor]:
        """The student's losses on a fresh generated batch (for epoch hooks that measure the
        loss, e.g. EWGS's delta update); no generator update."""
        with torch.no_grad():
            images, labels = self.generator.generate(batch.size)
            teacher_logits = models.teacher(images)
        teacher_maps = dict(self.teacher_taps.features) if self.taps else {}
        logits = models.student(images)
        return self.student_losses(logits, teacher_logits, labels, teacher_maps)

    def prepare_student(self, student: nn.Module, phase: Phase) -> None:
        """Batch norms in eval mode (their affine parameters still train), and the activation
        ranges tracked during warm-up and frozen afterwards."""
        cfg = self.options
        plain = unwrap(student)
        if cfg.student_batchnorm == "eval":
            for module in plain.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if cfg.freeze_ranges_after_warmup:
            for _, quantizer in quantizers(plain):
                if quantizer.role == "activation" and hasattr(quantizer, "freeze"):
                    if not trains_student(phase):
                        quantizer.unfreeze()
                    else:
                        quantizer.freeze()

    def generator_losses(
        self, teacher_logits: Tensor, student_logits: Tensor, labels: Tensor
    ) -> dict[str, Tensor]:
        cfg = self.options
        t, s = teacher_logits, student_logits
        losses: dict[str, Tensor] = {}
        if cfg.generator_loss == "adadfq":
            if cfg.margin_weight > 0:
                margin = margin_loss(t, s, cfg.margin_low, cfg.margin_high)
                losses["g_margin"] = cfg.margin_weight * margin
            if cfg.disagreement_weight > 0:
                losses["g_disagreement"] = cfg.disagreement_weight * disagreement_loss(t, s, labels)
            if cfg.agreement_weight > 0:
                losses["g_agreement"] = cfg.agreement_weight * agreement_loss(t, s, labels)
        elif cfg.generator_ce_weight > 0:
            losses["g_ce"] = cfg.generator_ce_weight * F.cross_entropy(t, labels)
        if self.statistics is not None:
            losses["g_bns"] = cfg.bns_weight * self.statistics.loss()
        if not losses:
            raise ValueError("every generator loss weight is 0; the generator would not train")
        return losses

    def student_losses(
        self,
        logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor,
        teacher_maps: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        cfg = self.options
        logit_share = 1.0 if cfg.alpha is None else 1.0 - cfg.alpha
        rfd_share = 1.0 if cfg.alpha is None else cfg.alpha
        losses: dict[str, Tensor] = {}
        if cfg.logit_weight > 0 and logit_share > 0:
            if cfg.logit_loss == "entropy":
                logit = softened_difference_entropy(logits, teacher_logits, cfg.temperature)
            else:
                logit = kd_kl_divergence(logits, teacher_logits, cfg.temperature)
            losses[cfg.logit_loss] = logit_share * cfg.logit_weight * logit
        if self.taps and rfd_share > 0:
            rfd = self.rfd(self.student_taps.features, teacher_maps)
            losses["rfd"] = rfd_share * cfg.rfd_weight * rfd
        if cfg.label_weight > 0:
            losses["ce"] = cfg.label_weight * F.cross_entropy(logits, labels)
        if not losses:
            raise ValueError("every student loss weight is 0; the student would not train")
        return losses


def trains_student(phase: Phase) -> bool:
    return phase.trains is None or "weights" in phase.trains


@register_method("adadfq")
class AdaDFQ(AKT):
    label = "AdaDFQ (data-free)"
    name = "adadfq"
    Options = AdaDFQOptions


@register_method("gdfq")
class GDFQ(AKT):
    label = "GDFQ (data-free)"
    name = "gdfq"
    Options = GDFQOptions


class PTQGeneratedOptions(GDFQOptions):
    """The generator learns GDFQ's loss; the student is never stepped."""

    warmup_epochs: int = Field(0, ge=0)  # unused: every epoch trains only the generator


@register_method("ptq_generated")
class PTQGenerated(AKT):
    """Post-training quantization on generated images, the plain data-free baseline: every
    epoch trains only the generator (GDFQ's loss by default: CE(t, y) + 0.1 BNS, which needs no
    student), while the student's activation ranges (``minmax``: an EMA) track the generated
    batches; its weights are never trained. The student's losses are logged as a measure.
    Other quantizers keep the ranges they were calibrated with on the first generated batch."""

    label = "PTQ on generated images (data-free)"
    name = "ptq_generated"
    Options = PTQGeneratedOptions

    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("calibrate", epochs, trains=(GENERATOR,))]

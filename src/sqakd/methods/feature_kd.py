"""Feature KD: the SQAKD Table-7 distillation zoo (AT, NST, SP, RKD, CC, FitNet, VID, CRD, FSP,
FT, KD) as one method, with labels (the paper's baselines) or label-free.

loss = CE(student, labels)                      (labels: true, the Table-7 setting: gamma 1, alpha 0)
     | T**2 KL(teacher || student)              (labels: false: SQAKD's KL at T = 4 instead of CE)
     + sum over the chosen losses of weight * feature_loss(student features, teacher features)

- losses: ``method.loss`` (one registered feature loss, default ``at``, its released weight
  unless ``method.loss_weight``) or ``method.losses: {at: 1000, kd: 1}`` (which replaces ``loss``) (a weight of ``null`` means
  the released one); ``kd`` is the logit KL (T = ``method.temperature``), so with labels
  ``losses: {kd: 1}`` is "KD with labels", and label-free runs add no second KL when it is listed;
- taps: each loss reads what the released code feeds it (``reads`` in the feature-loss registry):
  the stage outputs (``method.layers``, default ``stages``: the registered model's stage names; a
  user model names its modules), the last or middle of them, the input of the first stage then
  the stage outputs (FSP's chain), or the classifier's input (the embedding; the classifier is
  found as the outermost module whose output is the logits, or named by ``method.classifier``);
- modules: each loss is built by its registry entry from the teacher's probed feature shapes (the
  student is the same architecture, prepared from a copy of the teacher, and not calibrated yet),
  and its adapters, regressors and embeddings train in the ``adapters`` group;
- two-stage losses: FSP and FT have a pre-stage (released: 30 epochs) run as phase ``pre``:
  FSP trains the student's weights and quantizers on FSP alone (and is not applied afterwards, as
  released); FT trains its paraphraser (group ``paraphraser``, released SGD 0.01) on
  reconstructing the teacher's last map, which is frozen in phase ``train``. The pre-stage's
  length is ``method.loss_options.<loss>.pre_epochs``;
- per-loss options: ``method.loss_options: {crd: {negatives: 4096, sampler: instance}}``.

Differences from the released scripts: FSP's pre-stage uses the run's weight and quantizer
optimizers (the released init has its own SGD) with the student in train mode (released: eval);
the auxiliary modules get the ``adapters`` group's optimizer (``train.optimizers.adapters``,
else the student's weight settings, as released).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..distill import (
    BuildContext,
    FeatureLoss,
    FeatureTaps,
    available_feature_losses,
    feature_loss_class,
    kd_kl_divergence,
)
from ..distill.feature_registry import check_options
from ..models import resolve_tap_names
from .base import Batch, DataShapes, Method, Models, Needs, Phase, Step, register_method

#: a loss option every two-stage loss takes: the length of its pre-stage in epochs
PRE_EPOCHS = "pre_epochs"


class FeatureKDOptions(BaseModel):
    """Feature KD's keys under ``method:``."""

    model_config = ConfigDict(extra="forbid")

    loss: str = "at"  # the first row of Table 7; method.losses replaces it
    loss_weight: float | None = Field(None, ge=0)
    losses: dict[str, float | None] | None = None
    labels: bool = True
    layers: Literal["stages"] | list[str] = "stages"
    classifier: str | None = None
    temperature: float = Field(4.0, gt=0)
    loss_options: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check(self) -> FeatureKDOptions:
        registered = ", ".join(available_feature_losses())
        if self.loss_weight is not None and self.losses is not None:
            raise ValueError("method.loss_weight goes with method.loss; with method.losses give "
                             "each loss its weight")  # fmt: skip
        if self.losses is not None and not self.losses:
            raise ValueError("method.losses is empty; name at least one feature loss")
        for name in self.weights():
            if name not in available_feature_losses():
                raise ValueError(f"unknown feature loss {name!r}; choose one of: {registered}")
        for name, options in self.loss_options.items():
            if name not in self.weights():
                raise ValueError(
                    f"method.loss_options.{name} is for a loss this run does not use "
                    f"({', '.join(self.weights())})"
                )
            check_options(name, options)
            if PRE_EPOCHS in options:
                if not isinstance(options[PRE_EPOCHS], int) or options[PRE_EPOCHS] < 1:
                    raise ValueError(f"method.loss_options.{name}.{PRE_EPOCHS} must be >= 1")
        staged = [name for name in self.weights() if feature_loss_class(name).pre_epochs]
        if len(staged) > 1:
            raise ValueError(f"{' and '.join(staged)} both have a pre-stage; use one of them")
        for name in self.weights():
            options = {k: v for k, v in self.loss_options.get(name, {}).items() if k != PRE_EPOCHS}
            if feature_loss_class(name).needs_labels(self.labels, **options) and not self.labels:
                raise ValueError(
                    f"feature loss {name!r} reads labels with these options but method.labels is "
                    "false; set method.labels: true, or the loss's label-free option"
                    + (" (method.loss_options.crd.sampler: instance)" if name == "crd" else "")
                )
        return self

    def weights(self) -> dict[str, float]:
        """``{loss name: weight}``, the released weight where none is given."""
        if self.losses is None:
            chosen: dict[str, float | None] = {self.loss: self.loss_weight}
        else:
            chosen = dict(self.losses)
        return {
            name: (weight if weight is not None else feature_loss_class(name).weight)
            if name in available_feature_losses()
            else 0.0
            for name, weight in chosen.items()
        }

    def build_options(self, name: str) -> dict[str, Any]:
        return {k: v for k, v in self.loss_options.get(name, {}).items() if k != PRE_EPOCHS}


@register_method("feature_kd")
class FeatureKD(Method):
    label = "feature KD"
    Options = FeatureKDOptions
    options: FeatureKDOptions

    def __init__(self, options: FeatureKDOptions | None = None) -> None:
        super().__init__(options)
        self.weights = self.options.weights()
        self.feature_losses = nn.ModuleDict()
        self.keys: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------- declarations
    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(
            labels=self.options.labels,
            teacher="features",
            sample_index=any(feature_loss_class(n).needs_index for n in self.weights),
            label_free_setting="method.labels=false",
        )

    def two_stage(self) -> tuple[str, type[FeatureLoss], int] | None:
        """``(name, class, pre-stage epochs)`` of the run's two-stage loss, if any."""
        for name in self.weights:
            cls = feature_loss_class(name)
            if cls.pre_epochs:
                epochs = self.options.loss_options.get(name, {}).get(PRE_EPOCHS, cls.pre_epochs)
                return name, cls, int(epochs)
        return None

    def phases(self, epochs: int) -> list[Phase]:
        staged = self.two_stage()
        if staged is None:
            return [Phase("train", epochs)]
        name, cls, pre = staged
        if epochs <= pre:
            raise ValueError(
                f"feature loss {name!r} first runs a {pre}-epoch pre-stage but train.epochs is "
                f"{epochs}; set train.epochs above {pre} or method.loss_options.{name}."
                f"{PRE_EPOCHS} below {epochs}"
            )
        if cls.pre_trains == "student":
            return [
                Phase("pre", pre, trains=("weights", "quantizers")),
                Phase("train", epochs - pre),
            ]
        main = ("weights", "quantizers", "adapters")
        return [Phase("pre", pre, trains=(cls.pre_group,)), Phase("train", epochs - pre, main)]

    def parameter_groups(self, models: Models) -> dict[str, list[nn.Parameter]]:
        groups = super().parameter_groups(models)
        for loss in self.feature_losses.values():
            own = [p for m in loss.pre_stage_modules() for p in m.parameters() if p.requires_grad]
            if not own:
                continue
            ids = {id(p) for p in own}
            groups["adapters"] = [p for p in groups.get("adapters", []) if id(p) not in ids]
            groups[loss.pre_group] = own
        return groups

    def optimizer_settings(self, group, default):
        for loss in self.feature_losses.values():
            if group == loss.pre_group and loss.pre_optimizer:
                return default.model_copy(update=loss.pre_optimizer)
        return default

    # ---------------------------------------------------------------------------- set up
    def setup(self, models: Models, shapes: DataShapes) -> None:
        cfg = self.options
        assert models.teacher is not None
        classes = {name: feature_loss_class(name) for name in self.weights}
        reads = {cls.reads for cls in classes.values()}
        layers: list[str] = []
        if reads & {"stages", "last", "middle", "chain"}:
            layers = resolve_tap_names(cfg.layers, shapes.model_name)
        device = next(models.teacher.parameters()).device
        probe = torch.zeros(1, *shapes.image_shape, device=device)
        classifier = ""
        if "embedding" in reads:
            classifier = cfg.classifier or find_classifier(models.teacher, probe)
        keys = {
            "stages": list(layers),
            "last": layers[-1:],
            "middle": layers[len(layers) // 2 : len(layers) // 2 + 1],
            "chain": [f"{layers[0]}:input", *layers] if layers else [],
            "embedding": [f"{classifier}:input"],
            "logits": ["logits"],
        }
        self.keys = {name: keys[cls.reads] for name, cls in classes.items()}
        wanted = {key for name in self.keys for key in self.keys[name]}
        outputs = [layer for layer in layers if layer in wanted]
        inputs = [key.removesuffix(":input") for key in wanted if key.endswith(":input")]
        self._taps: dict[str, list[FeatureTaps]] = {"student": [], "teacher": []}
        for role, model in (("student", models.student), ("teacher", models.teacher)):
            if outputs:
                self._taps[role].append(FeatureTaps(model, outputs))
            if inputs:
                # cloned: a stage may begin with an in-place op on its input (small_cnn's ReLU)
                taps = FeatureTaps(model, sorted(inputs), capture="input", clone=True)
                self._taps[role].append(taps)
        with torch.no_grad():  # feature shapes, from the teacher (the student is not calibrated)
            logits = models.teacher(probe)
            probed = {
                key: tuple(v.shape[1:]) for key, v in self._features("teacher", logits).items()
            }
        context = BuildContext(
            train_size=shapes.train_size,
            num_classes=shapes.num_classes,
            labels=cfg.labels,
            temperature=cfg.temperature,
        )
        for name, cls in classes.items():
            sized = {key: probed[key] for key in self.keys[name]}
            self.feature_losses[name] = cls.build(sized, sized, context, **cfg.build_options(name))

    def _features(self, role: str, logits: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = {"logits": logits}
        for taps in self._taps[role]:
            suffix = ":input" if taps.capture == "input" else ""
            features.update({f"{k}{suffix}": v for k, v in taps.features.items()})
        return features

    def _pick(self, name: str, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: features[key] for key in self.keys[name]}

    # ------------------------------------------------------------------------------ the step
    def losses(self, models: Models, batch: Batch, phase: Phase) -> dict[str, Tensor]:
        assert models.teacher is not None and batch.images is not None
        if phase.name == "pre":
            return self._pre_stage_losses(models, batch)
        cfg = self.options
        logits = models.student(batch.images)
        student = self._features("student", logits)
        with torch.no_grad():
            teacher = self._features("teacher", models.teacher(batch.images))
        losses: dict[str, Tensor] = {}
        if cfg.labels:
            losses["ce"] = F.cross_entropy(logits, batch.labels)
        elif "kd" not in self.weights:
            losses["kd"] = kd_kl_divergence(logits, teacher["logits"], cfg.temperature)
        for name, loss in self.feature_losses.items():
            if not loss.main_stage or self.weights[name] == 0:
                continue
            value = loss(self._pick(name, student), self._pick(name, teacher),
                         index=batch.index, labels=batch.labels)  # fmt: skip
            losses[name] = self.weights[name] * value
        return losses

    def _pre_stage_losses(self, models: Models, batch: Batch) -> dict[str, Tensor]:
        staged = self.two_stage()
        assert staged is not None and models.teacher is not None
        name, cls, _ = staged
        loss = self.feature_losses[name]
        with torch.no_grad():
            teacher = self._features("teacher", models.teacher(batch.images))
        if cls.pre_trains == "own":  # the loss's own modules learn from the teacher alone
            return {f"{name}_pre": loss.pre_stage_loss(None, self._pick(name, teacher))}
        student = self._features("student", models.student(batch.images))
        value = loss.pre_stage_loss(self._pick(name, student), self._pick(name, teacher))
        return {name: self.weights[name] * value}

    def training_step(self, models: Models, batch: Batch, step: Step) -> dict[str, Tensor]:
        losses = self.losses(models, batch, step.phase)
        step.update(losses)
        if step.phase.name != "pre":
            for loss in self.feature_losses.values():
                loss.after_update()  # e.g. CRD's memory bank, only on a real step
        return losses


def find_classifier(model: nn.Module, probe: Tensor) -> str:
    """The name of the outermost submodule whose output is the model's output (the logits)."""
    outputs: list[tuple[str, Any]] = []
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: outputs.append((name, out)))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            logits = model(probe)
    finally:
        for handle in handles:
            handle.remove()
    found = [name for name, out in outputs if out is logits]
    if not found:
        raise ValueError(
            f"no submodule of {type(model).__name__} returns the logits itself, so the embedding "
            "(the classifier's input) cannot be found; name the classifier: method.classifier"
        )
    return found[-1]

"""How a run is organised: each method is a short recipe registered by name (see base.py for the
contract: needs, options, parameter groups, phases and the step)."""

from . import akt, faqd, feature_kd, qkd, sqakd  # noqa: F401  (each module registers its methods)
from .base import (
    TEACHER_GROUP,
    Batch,
    DataShapes,
    Method,
    Models,
    Needs,
    NoOptions,
    Phase,
    Step,
    available_methods,
    build_method,
    check_phases,
    method_class,
    phase_at,
    register_method,
    student_groups,
    validate_options,
)

__all__ = [
    "TEACHER_GROUP",
    "Batch",
    "DataShapes",
    "Method",
    "Models",
    "Needs",
    "NoOptions",
    "Phase",
    "Step",
    "available_methods",
    "build_method",
    "check_phases",
    "method_class",
    "phase_at",
    "register_method",
    "student_groups",
    "validate_options",
]

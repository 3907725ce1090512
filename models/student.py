"""Students: any timm model from ``MODEL[,key=value...]``, without a classifier (or, to learn soft
labels, with one in the teacher's class space: ``with_classifier``).

Random-init weights come from the caller's RNG (``--seed``); ``pretrained=true`` or
``checkpoint=PATH`` start from weights. The resolved ``DataConfig`` sizes and normalises the
student's input; the kwargs timm accepted are kept so the export can print a load line that
rebuilds exactly this model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .create import build_model, load_checkpoint
from .data_config import DataConfig, resolve_data_config
from .spec import ModelSpec


@dataclass(frozen=True)
class Student:
    model: nn.Module
    data: DataConfig
    spec: ModelSpec
    kwargs: dict  # what timm.create_model accepted (num_classes=0 included)


def create_student(spec: ModelSpec | str) -> Student:
    spec = ModelSpec.parse_student(spec) if isinstance(spec, str) else spec
    model, kwargs = build_model(spec, init_seed=None, role="student", num_classes=0)
    if spec.checkpoint:
        load_checkpoint(model, spec, who="student")
    return Student(model, resolve_data_config(model, spec), spec, kwargs)


def with_classifier(student: Student, classes: int) -> Student:
    """The student with a classifier of ``classes`` outputs: timm's own head (``reset_classifier``),
    so ``kdcache export`` keeps it and timm loads it with ``num_classes=classes``. 0: unchanged."""
    if not classes:
        return student
    if getattr(student.model, "num_classes", 0) != classes:
        student.model.reset_classifier(classes)
    return dataclasses.replace(student, kwargs={**student.kwargs, "num_classes": classes})

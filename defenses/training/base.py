"""The contract of a training-time (teacher) defense, and its registry.

A teacher defense turns a plain victim classifier (the *baseline*, trained by its recipe) into a
defended one, trained on the same private data, that the API serves like any other: e.g.
``stealrange train-victim --defense ast`` writes ``fmnist-classifier-ast`` beside
``fmnist-classifier``. Each defense declares its parameters as a pydantic model (checked at
construction) and may ask the API to serve its outputs through an output pipeline
(:meth:`TeacherDefense.served_pipeline`, written as the model's ``defenses.json``).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from common.datasets import ImageData
from common.models import Classifier
from common.training import TrainConfig


class TeacherDefenseParams(BaseModel):
    """Parameters of a teacher defense (each adds its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherDefense(abc.ABC):
    """Train a defended teacher from a baseline and the private training data."""

    name: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type[TeacherDefenseParams]] = TeacherDefenseParams

    def __init__(self, params: BaseModel | dict[str, Any] | None = None, **overrides: Any) -> None:
        base = params.model_dump() if isinstance(params, BaseModel) else dict(params or {})
        self.params = self.Params.model_validate({**base, **overrides})

    @abc.abstractmethod
    def train(
        self,
        baseline: Classifier,
        fresh: Classifier,
        data: ImageData,
        cfg: TrainConfig,
        progress: bool | None,
    ) -> Classifier:
        """The defended teacher: ``fresh`` (an untrained network of the baseline's architecture and
        normalisation) trained on ``data`` with ``cfg``, or the baseline itself when the defense is
        in how it is served."""

    def served_pipeline(self) -> list[dict[str, Any]]:
        """Output defenses the API applies to this teacher (``defenses.json``); none by default."""
        return []


_TEACHER_DEFENSES: dict[str, type[TeacherDefense]] = {}


def register_teacher_defense(cls: type[TeacherDefense]) -> type[TeacherDefense]:
    """Class decorator: register a teacher defense under its ``name``."""
    if cls.name in _TEACHER_DEFENSES:
        raise ValueError(f"teacher defense {cls.name!r} is already registered")
    _TEACHER_DEFENSES[cls.name] = cls
    return cls


def list_teacher_defenses() -> list[str]:
    """Names of every registered teacher defense."""
    return sorted(_TEACHER_DEFENSES)


def build_teacher_defense(name: str, params: dict[str, Any] | None = None) -> TeacherDefense:
    """The teacher defense ``name`` with ``params`` (validated; unknown names are errors)."""
    key = name.strip().lower().replace("-", "_")
    if key not in _TEACHER_DEFENSES:
        raise ValueError(f"unknown teacher defense {name!r}; known: {', '.join(list_teacher_defenses())}")
    return _TEACHER_DEFENSES[key](params or {})

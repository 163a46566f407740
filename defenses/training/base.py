"""The contract of a training-time (teacher) defense, and its registry (:data:`TEACHER_DEFENSES`).

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

from common.datasets import ImageData
from common.models import Classifier
from common.registry import Configurable, Params, Registry
from common.training import TrainConfig


class TeacherDefenseParams(Params):
    """Parameters of a teacher defense (each adds its own)."""


class TeacherDefense(Configurable, abc.ABC):
    """Train a defended teacher from a baseline and the private training data."""

    Params: ClassVar[type[TeacherDefenseParams]] = TeacherDefenseParams

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


# Every teacher defense by name: ``@TEACHER_DEFENSES.register``; ``TEACHER_DEFENSES.build("ast", {...})``.
TEACHER_DEFENSES = Registry[type[TeacherDefense]]("teacher defense")

"""Stingy Teacher (Ma et al., "Stingy Teacher: Sparse Logits Suffice to Fail Knowledge Distillation",
2022), the sparse-output comparison of Adversarial Sparse Teacher: the plain teacher, served with only
its top-k outputs (k = 2 for 10 classes).

Here it is the baseline itself with the API's ``top_k`` output defense (``defenses.json``): the
renormalised top-k probabilities a student distils at temperature T, ``p^(1/T)`` renormalised, are
exactly ``softmax(z_sparse / T)`` of the sparse logits (the kept classes' logits, -inf elsewhere),
whatever T. No retraining.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from common.datasets import ImageData
from common.models import Classifier
from common.training import TrainConfig
from defenses.training.base import TEACHER_DEFENSES, TeacherDefense, TeacherDefenseParams


class StingyParams(TeacherDefenseParams):
    """How many outputs are kept."""

    k: int = Field(2, ge=1, description="top-k outputs served")


@TEACHER_DEFENSES.register
class StingyTeacher(TeacherDefense):
    """The baseline, served sparse."""

    name = "stingy"
    paper = "Ma et al., Stingy Teacher: Sparse Logits Suffice to Fail Knowledge Distillation, 2022"
    Params = StingyParams
    params: StingyParams

    def train(
        self,
        baseline: Classifier,
        fresh: Classifier,
        data: ImageData,
        cfg: TrainConfig,
        progress: bool | None,
    ) -> Classifier:
        return baseline

    def served_pipeline(self) -> list[dict[str, Any]]:
        return [{"name": "top_k", "k": self.params.k, "renormalise": True}]

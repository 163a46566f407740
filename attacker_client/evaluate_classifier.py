"""How good a stolen classifier is (PAPERS.md, Metrics; Pape et al., ESANN 2023; Orekondy et al.,
CVPR 2019), on held-out test images the attacker never queried:

- accuracy on the true labels;
- agreement (fidelity): the share of images where the surrogate's argmax is the victim's;
- KL(P_victim || P_surrogate) at T = 1 and the L1 distance between the two distributions;

for every member, for their combination (mean of probabilities) and for the method's single
deterministic network, plus the members' diversity (prediction variance, pairwise disagreement).
The victim's outputs come from its white-box checkpoint (a reference outside the attacker's budget,
never queried through the API); without one only accuracy is reported. :class:`ClassifierEvalSpec`
says on how many images (the ``classifier`` family's evaluation spec in a scenario:
``evaluation: {classifier: {...}}``); :class:`ClassifierEvaluation` is what
:func:`evaluate_classifier_stealing` returns.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from attacker_client.uq.base import diversity, member_probabilities
from common.metrics import accuracy, agreement, kl_divergence, l1_distance
from common.models import Classifier


class ClassifierEvalSpec(BaseModel):
    """How stolen classifiers are scored: held-out test images of the victim's dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    test_size: int = Field(2000, ge=10, description="held-out test images for the scores")
    monitor_size: int = Field(500, ge=2, description="images on which members are logged in training")


class ClassifierScores(BaseModel):
    """Accuracy on the true labels; with the victim's probabilities also agreement (fidelity),
    KL(victim || surrogate) and L1 (``None`` without them)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    accuracy: float
    agreement: float | None = None
    kl: float | None = None
    l1: float | None = None

    def metrics(self) -> dict[str, float]:
        """The measured scores only (a checkpoint card's ``metrics``)."""
        return self.model_dump(exclude_none=True)


class Diversity(BaseModel):
    """Diversity of the members' predictions (:func:`attacker_client.uq.base.diversity`)."""

    members: int
    variance: float
    disagreement: float
    member_agreement: list[float] | None = None
    combined_agreement: float | None = None


class ClassifierEvaluation(BaseModel):
    """Scores of the single network, the members' combination and every member on ``test_images``
    held-out images; the victim's accuracy when its checkpoint is known; the members' diversity."""

    test_images: int
    victim: ClassifierScores | None
    single: ClassifierScores
    combined: ClassifierScores
    members: list[ClassifierScores]
    diversity: Diversity


def classifier_scores(
    probs: torch.Tensor, labels: torch.Tensor, victim_probs: torch.Tensor | None
) -> ClassifierScores:
    """Accuracy, and with the victim's probabilities agreement, KL(victim || surrogate) and L1."""
    if victim_probs is None:
        return ClassifierScores(accuracy=accuracy(probs, labels))
    return ClassifierScores(
        accuracy=accuracy(probs, labels),
        agreement=agreement(probs, victim_probs),
        kl=kl_divergence(victim_probs, probs),
        l1=l1_distance(victim_probs, probs),
    )


def evaluate_classifier_stealing(
    members: list[Classifier],
    single: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    victim: Classifier | None,
    device: torch.device,
) -> ClassifierEvaluation:
    """Scores of the members, their combination and the single network on uint8 ``images``."""
    on = [m.to(device) for m in members]
    probs = member_probabilities(on, images, device)
    single_probs = member_probabilities([single.to(device)], images, device)[0]
    victim_probs = (
        member_probabilities([victim.to(device)], images, device)[0] if victim is not None else None
    )
    reference = victim_probs.argmax(dim=1) if victim_probs is not None else None
    combined = probs.mean(dim=0)
    return ClassifierEvaluation(
        test_images=len(images),
        victim=ClassifierScores(accuracy=accuracy(victim_probs, labels))
        if victim_probs is not None
        else None,
        single=classifier_scores(single_probs, labels, victim_probs),
        combined=classifier_scores(combined, labels, victim_probs),
        members=[classifier_scores(p, labels, victim_probs) for p in probs],
        diversity=Diversity.model_validate(diversity(probs, reference)),
    )

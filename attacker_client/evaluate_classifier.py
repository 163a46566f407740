"""How good a stolen classifier is (PAPERS.md, Metrics; Pape et al., ESANN 2023; Orekondy et al.,
CVPR 2019), on held-out test images the attacker never queried:

- accuracy on the true labels;
- agreement (fidelity): the share of images where the surrogate's argmax is the victim's;
- KL(P_victim || P_surrogate) at T = 1 and the L1 distance between the two distributions;

for every member, for their combination (mean of probabilities) and for the method's single
deterministic network, plus the members' diversity (prediction variance, pairwise disagreement).
The victim's outputs come from its white-box checkpoint (a reference outside the attacker's budget,
never queried through the API); without one only accuracy is reported.
"""

from __future__ import annotations

from typing import Any

import torch

from attacker_client.uq.base import diversity, member_probabilities
from common.metrics import accuracy, agreement, kl_divergence, l1_distance
from common.models import Classifier


def classifier_scores(
    probs: torch.Tensor, labels: torch.Tensor, victim_probs: torch.Tensor | None
) -> dict[str, float]:
    """Accuracy, and with the victim's probabilities agreement, KL(victim || surrogate) and L1."""
    scores = {"accuracy": accuracy(probs, labels)}
    if victim_probs is not None:
        scores["agreement"] = agreement(probs, victim_probs)
        scores["kl"] = kl_divergence(victim_probs, probs)
        scores["l1"] = l1_distance(victim_probs, probs)
    return scores


def evaluate_classifier_stealing(
    members: list[Classifier],
    single: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    victim: Classifier | None,
    device: torch.device,
) -> dict[str, Any]:
    """Scores of the members, their combination and the single network on uint8 ``images``."""
    on = [m.to(device) for m in members]
    probs = member_probabilities(on, images, device)
    single_probs = member_probabilities([single.to(device)], images, device)[0]
    victim_probs = (
        member_probabilities([victim.to(device)], images, device)[0] if victim is not None else None
    )
    reference = victim_probs.argmax(dim=1) if victim_probs is not None else None
    combined = probs.mean(dim=0)
    return {
        "test_images": len(images),
        "victim": {"accuracy": accuracy(victim_probs, labels)} if victim_probs is not None else None,
        "single": classifier_scores(single_probs, labels, victim_probs),
        "combined": classifier_scores(combined, labels, victim_probs),
        "members": [classifier_scores(p, labels, victim_probs) for p in probs],
        "diversity": diversity(probs, reference),
    }

"""Reverse sigmoid: "Defending Against Neural Network Model Stealing Attacks Using Deceptive
Perturbations" (Lee et al., IEEE S&P Workshops 2019), as ART's ``ReverseSigmoid`` computes it.

With p clipped to [1e-9, 1 - 1e-9]:

``r = beta * (sigmoid(-gamma * log((1 - p) / p)) - 0.5)``, ``q = clip(p - r, 0, 1)``, and the
answer ``q / sum(q)``.

The perturbation keeps the arg-max in most cases while making the logits an attacker would invert
from the probabilities misleading. Defaults beta = 1.0, gamma = 0.1 (ART's).
"""

from __future__ import annotations

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense

CLIP = 1e-9


class ReverseSigmoidParams(DefenseParams):
    beta: float = Field(1.0, gt=0, description="magnitude of the perturbation")
    gamma: float = Field(0.1, gt=0, description="dataset- and model-dependent convergence parameter")


def reverse_sigmoid(p: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """The formula above, row-wise on probabilities ``[n, C]``."""
    clipped = p.clamp(CLIP, 1.0 - CLIP)
    perturbation = beta * (torch.sigmoid(-gamma * torch.log((1.0 - clipped) / clipped)) - 0.5)
    q = (p - perturbation).clamp(0.0, 1.0)
    total = q.sum(dim=1, keepdim=True)
    return torch.where(total > 0, q / total.clamp_min(1e-30), p)


@DEFENSES.register
class ReverseSigmoid(OutputDefense):
    """Probabilities minus a reverse-sigmoid perturbation, renormalised."""

    name = "reverse_sigmoid"
    paper = "Lee et al., IEEE S&P Workshops 2019"
    kinds = frozenset({"classifier"})
    Params = ReverseSigmoidParams
    params: ReverseSigmoidParams

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        return reverse_sigmoid(outputs, self.params.beta, self.params.gamma)

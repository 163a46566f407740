"""High-confidence cutoff: answer only the confident classes (ART's ``HighConfidence``, default
cutoff 0.25): probabilities below ``cutoff`` are set to 0.

Unlike ART, the kept mass is renormalised to 1 (``renormalise=False`` keeps ART's raw values), and
the arg-max is always kept, so every answer still names a class.
"""

from __future__ import annotations

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense


class HighConfidenceParams(DefenseParams):
    cutoff: float = Field(0.25, ge=0, le=1, description="probabilities below are zeroed")
    renormalise: bool = Field(True, description="rescale the kept probabilities to sum 1")


@DEFENSES.register
class HighConfidence(OutputDefense):
    """Zero the probabilities under ``cutoff`` (never the arg-max)."""

    name = "high_confidence"
    paper = "ART HighConfidence postprocessor (Nicolae et al., 2018)"
    kinds = frozenset({"classifier"})
    Params = HighConfidenceParams
    params: HighConfidenceParams

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        keep = outputs >= self.params.cutoff
        keep.scatter_(1, outputs.argmax(dim=1, keepdim=True), True)
        kept = torch.where(keep, outputs, torch.zeros_like(outputs))
        if self.params.renormalise:
            kept = kept / kept.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return kept

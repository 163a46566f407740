"""Top-k: keep the ``k`` largest probabilities and zero the rest (Tramèr et al., USENIX Security
2016; Orekondy et al., CVPR 2019, use truncated outputs as a defense baseline).

Defaults: k = 3, the kept mass renormalised to 1 (``renormalise=False`` keeps the raw values, as
many APIs show them). The arg-max is always kept, so top-1 accuracy is untouched.
"""

from __future__ import annotations

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense


class TopKParams(DefenseParams):
    k: int = Field(3, ge=1, description="probabilities kept per image")
    renormalise: bool = Field(True, description="rescale the kept probabilities to sum 1")


@DEFENSES.register
class TopK(OutputDefense):
    """Zero all but the ``k`` largest probabilities."""

    name = "top_k"
    paper = "Tramèr et al., USENIX Security 2016; Orekondy et al., CVPR 2019"
    kinds = frozenset({"classifier"})
    Params = TopKParams
    params: TopKParams

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        k = min(self.params.k, outputs.shape[1])
        # A stable sort breaks ties by position, as arg-max does: the served arg-max never changes.
        values, indices = outputs.sort(dim=1, descending=True, stable=True)
        kept = torch.zeros_like(outputs).scatter_(1, indices[:, :k], values[:, :k])
        if self.params.renormalise:
            kept = kept / kept.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return kept

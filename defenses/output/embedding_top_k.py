"""Top-k dimensions of embeddings: keep the ``k`` coordinates of largest magnitude, zero the rest (a
sparsifying output defense for encoder APIs; Liu et al., StolenEncoder, CCS 2022, section 6, study
perturbing the embedding's coordinates). Default k = 64.
"""

from __future__ import annotations

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense


class EmbeddingTopKParams(DefenseParams):
    k: int = Field(64, ge=1, description="coordinates kept per embedding")


@DEFENSES.register
class EmbeddingTopK(OutputDefense):
    """Zero all but the ``k`` largest-magnitude coordinates."""

    name = "embedding_top_k"
    paper = "Liu et al., StolenEncoder, CCS 2022 (output perturbation)"
    kinds = frozenset({"encoder"})
    Params = EmbeddingTopKParams
    params: EmbeddingTopKParams

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        k = min(self.params.k, outputs.shape[1])
        indices = outputs.abs().topk(k, dim=1).indices
        return torch.zeros_like(outputs).scatter_(1, indices, outputs.gather(1, indices))

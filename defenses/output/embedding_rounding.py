"""Rounding / quantisation of embeddings (Liu et al., StolenEncoder, CCS 2022, section 6, study
rounding the victim's embeddings to a few decimals as a defense).

Default: round every coordinate to ``decimals = 1`` place. With ``step`` set instead, coordinates
are quantised to multiples of ``step`` (a uniform quantiser).
"""

from __future__ import annotations

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense


class EmbeddingRoundingParams(DefenseParams):
    decimals: int = Field(1, ge=0, le=8, description="decimal places kept")
    step: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="quantisation step (overrides decimals)"
    )


@DEFENSES.register
class EmbeddingRounding(OutputDefense):
    """``round(e, decimals)`` or ``step * round(e / step)``."""

    name = "embedding_rounding"
    paper = "Liu et al., StolenEncoder, CCS 2022 (rounding defense)"
    kinds = frozenset({"encoder"})
    Params = EmbeddingRoundingParams
    params: EmbeddingRoundingParams

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        if self.params.step is not None:
            return torch.round(outputs / self.params.step) * self.params.step
        return torch.round(outputs, decimals=self.params.decimals)

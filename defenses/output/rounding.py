"""Rounding: answer probabilities rounded to ``decimals`` places (Tramèr et al., USENIX Security
2016, section 8; ART's ``Rounded``, default 3 decimals).

Coarse confidences leak less to equation-solving and distillation attacks while the arg-max almost
never changes (ties aside). The rounded values are served as they are, not renormalised (as ART).
"""

from __future__ import annotations

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense


class RoundingParams(DefenseParams):
    decimals: int = Field(3, ge=0, le=8, description="decimal places kept")


@DEFENSES.register
class Rounding(OutputDefense):
    """``round(p, decimals)``."""

    name = "rounding"
    paper = "Tramèr et al., USENIX Security 2016; ART Rounded"
    kinds = frozenset({"classifier"})
    Params = RoundingParams
    params: RoundingParams

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        return torch.round(outputs, decimals=self.params.decimals)

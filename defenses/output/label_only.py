"""Label only: answer the arg-max class as a one-hot distribution (ART's ``ClassLabels``).

The weakest interface a classifier API can offer (Tramèr et al., USENIX Security 2016, study the
label-only setting; Orekondy et al., CVPR 2019, use it as a defense baseline): it hides every
confidence and keeps the top-1 answer, so honest users lose nothing in accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from defenses.base import DEFENSES, DefenseContext, OutputDefense


@DEFENSES.register
class LabelOnly(OutputDefense):
    """Probabilities -> one-hot of their arg-max."""

    name = "label_only"
    paper = "Tramèr et al., USENIX Security 2016 (label-only interface); ART ClassLabels"
    kinds = frozenset({"classifier"})

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        return F.one_hot(outputs.argmax(dim=1), outputs.shape[1]).to(outputs.dtype)

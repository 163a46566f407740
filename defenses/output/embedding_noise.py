"""Gaussian noise on embeddings: the simplest encoder-API defense studied against encoder stealing
(Liu et al., StolenEncoder, CCS 2022, section 6; Dubinski et al., B4B, NeurIPS 2023, as a baseline).

Each embedding ``e`` gets ``N(0, sigma^2)`` noise per dimension; with ``relative`` (default) sigma is
in units of the embedding's root-mean-square value, ``sigma * ||e|| / sqrt(d)``, so one setting fits
encoders of any scale. Default sigma = 0.1. Noise is deterministic per (key, image) as for every
random defense here (:class:`defenses.base.DefenseContext`).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense
from defenses.output.probability_noise import draw_noise


class EmbeddingNoiseParams(DefenseParams):
    sigma: float = Field(0.1, gt=0, description="noise standard deviation")
    relative: bool = Field(True, description="sigma in units of the embedding's RMS value")


@DEFENSES.register
class EmbeddingNoise(OutputDefense):
    """``e + N(0, sigma^2)`` per dimension."""

    name = "embedding_noise"
    paper = "Liu et al., StolenEncoder, CCS 2022 (noise defense)"
    kinds = frozenset({"encoder"})
    Params = EmbeddingNoiseParams
    params: EmbeddingNoiseParams

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        d = outputs.shape[1]
        noise = draw_noise(context, self.name, (d,), "gaussian", self.params.sigma).to(outputs.device)
        if self.params.relative:
            noise = noise * (outputs.norm(dim=1, keepdim=True) / math.sqrt(d))
        return outputs + noise.to(outputs.dtype)

"""Noisy probabilities: add Gaussian or Laplace noise to every probability, clip at 0, renormalise
(ART's ``GaussianNoise`` postprocessor, default scale 0.2, here with a Laplace option).

The noise of each image is drawn from :meth:`defenses.base.DefenseContext.generator`, seeded by
(server secret, key, model, image digest): the same key asking the same image again gets the same
answer, so the noise cannot be averaged away by repeating a query; another key gets other noise.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense


class ProbabilityNoiseParams(DefenseParams):
    scale: float = Field(0.2, gt=0, description="standard deviation (Gaussian) or scale b (Laplace)")
    distribution: Literal["gaussian", "laplace"] = "gaussian"


def draw_noise(
    context: DefenseContext, salt: str, shape: tuple[int, ...], distribution: str, scale: float
) -> torch.Tensor:
    """Per-image deterministic noise ``[n, *shape]`` (Laplace by inverse CDF of a uniform)."""

    def draw(generator: torch.Generator) -> torch.Tensor:
        if distribution == "gaussian":
            return torch.randn(shape, generator=generator) * scale
        u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
        return (-scale * torch.sign(u) * torch.log1p(-2.0 * u.abs())).float()

    return context.per_sample(salt, draw)


@DEFENSES.register
class ProbabilityNoise(OutputDefense):
    """``p + noise``, clipped at 0 and renormalised (the arg-max stays when every entry would be 0)."""

    name = "probability_noise"
    paper = "ART GaussianNoise postprocessor (Nicolae et al., 2018)"
    kinds = frozenset({"classifier"})
    Params = ProbabilityNoiseParams
    params: ProbabilityNoiseParams

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        p = self.params
        noise = draw_noise(context, self.name, tuple(outputs.shape[1:]), p.distribution, p.scale)
        q = (outputs + noise.to(outputs.device, outputs.dtype)).clamp_min(0.0)
        total = q.sum(dim=1, keepdim=True)
        fallback = torch.nn.functional.one_hot(outputs.argmax(dim=1), outputs.shape[1]).to(outputs.dtype)
        return torch.where(total > 0, q / total.clamp_min(1e-30), fallback)

"""StolenEncoder baseline: "StolenEncoder: Stealing Pre-trained Encoders in Self-supervised Learning"
(Liu et al., ACM CCS 2022), as RDA's released code runs it.

The victim embeds each query sample once, clean (queries = N, N = min(budget, pool)). The surrogate
is trained so that its embedding of the clean image *and* of a fresh augmented view both match the
victim's embedding of the clean image:

``L = d(f(x), h(x)) + lambda * d(f(aug(x)), h(x))``

with ``d`` the mean squared error and ``lambda = 20`` as in RDA's baseline code (``loss="cosine"``
gives the paper's negative cosine similarity instead). The augmentation is a mild crop/flip/jitter
(:meth:`common.views.ViewConfig.stolen_encoder`).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attacker_client.attacks.base import (
    EmbedOracle,
    EncoderAttack,
    EncoderAttackParams,
    StealingResult,
    ViewPreset,
    view_generator,
)
from attacker_client.attacks.contract import ATTACKS
from common.datasets import ImageData
from common.devices import autocast
from common.training import batch_to_device


class StolenEncoderParams(EncoderAttackParams):
    """StolenEncoder's hyper-parameters (RDA's baseline code defaults)."""

    aug_weight: float = Field(20.0, ge=0, description="lambda: weight of the augmented-view term")
    loss: Literal["mse", "cosine"] = Field("mse", description="distance between embeddings")
    train_view: ViewPreset = Field("stolen_encoder", description="the augmentation of the second term")


def embedding_distance(z: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean squared error, or the negative cosine similarity, averaged over the batch."""
    if kind == "mse":
        return F.mse_loss(z.float(), y.float())
    return -F.cosine_similarity(z.float(), y.float(), dim=1).mean()


@ATTACKS.register
class StolenEncoder(EncoderAttack):
    """One clean query per sample; match clean and augmented surrogate embeddings to it."""

    name = "stolen_encoder"
    paper = "Liu et al., StolenEncoder, ACM CCS 2022"
    Params = StolenEncoderParams
    params: StolenEncoderParams

    def queries_per_sample(self) -> int:
        return 1

    def steal(
        self,
        oracle: EmbedOracle,
        pool: ImageData,
        budget: int,
        device: torch.device,
        progress: bool | None = None,
    ) -> StealingResult:
        p = self.params
        samples = self.choose_samples(pool, budget)
        started = time.perf_counter()
        victim = self.query(oracle, samples.images)
        query_seconds = time.perf_counter() - started

        surrogate = self.build_surrogate(pool, victim.shape[1]).to(device)
        targets = victim.to(device)
        views = view_generator(p.train_view)

        def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x = batch_to_device(samples.images[batch], device)
            augmented = views(x, generator)
            with autocast(device):
                z = net(torch.cat([x, augmented]))
            y = targets[batch.to(device)]
            clean, aug = z[: len(batch)], z[len(batch) :]
            return embedding_distance(clean, y, p.loss) + p.aug_weight * embedding_distance(aug, y, p.loss)

        history, train_seconds = self.train(surrogate, len(samples), step, device, progress)
        return StealingResult(
            surrogate=surrogate.cpu(),
            history=history,
            samples=len(samples),
            queries=len(samples),
            query_seconds=query_seconds,
            train_seconds=train_seconds,
        )

"""RDA: "Refine, Discriminate and Align: Stealing Encoders via Sample-Wise Prototypes and
Multi-Relational Extraction" (Wu et al., ECCV 2024; arXiv 2312.00855).

1. *Refine*: each of the N query samples gets ``n_views`` (default 10) augmented views (crop scale
   0.9, ratio 1, flip, colour jitter 0.4/0.4/0.4/0.2 p 0.8, grayscale 0.2, blur p 0.1, solarise
   p 0.1: :meth:`common.views.ViewConfig.rda_prototype`). The victim embeds every view ONCE, before
   training; each embedding is L2-normalised and the ``n_views`` are averaged into the sample-wise
   prototype, which is *not* re-normalised (its norm below 1 says how consistent the views are).
   Queries = N x ``n_views``; N = budget // ``n_views`` (capped by the pool).
2. Query-free training: every step draws ``train_views`` (default 5) fresh views per sample (crop
   scale 0.75: :meth:`~common.views.ViewConfig.rda_train`); the surrogate's embeddings are
   L2-normalised and the loss is averaged over the views.
3. *Discriminate* + *Align*: :func:`attacker_client.attacks.losses.rda_loss`, temperature 0.07,
   alpha = beta = 1.

Optimiser as released: Adam, lr 1e-3, weight decay 1e-4, batch 100, 100 epochs.
"""

from __future__ import annotations

import time

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
from attacker_client.attacks.losses import rda_loss
from common.datasets import ImageData
from common.devices import autocast
from common.training import batch_to_device


class RDAParams(EncoderAttackParams):
    """RDA's hyper-parameters, with the released defaults."""

    n_views: int = Field(10, ge=1, description="augmented views per query sample for the prototype")
    train_views: int = Field(5, ge=1, description="views per sample per training step")
    temperature: float = Field(0.07, gt=0, description="Discriminate temperature")
    alpha: float = Field(1.0, ge=0, description="weight of the Discriminate term")
    beta: float = Field(1.0, ge=0, description="weight of the Align term")
    prototype_view: ViewPreset = Field("rda_prototype", description="views the victim embeds")
    train_view: ViewPreset = Field("rda_train", description="views the surrogate trains on")


def build_prototypes(embeddings: torch.Tensor) -> torch.Tensor:
    """Sample-wise prototypes from victim embeddings ``[N, n_views, d]``: each view's embedding is
    L2-normalised, then the views are averaged (no re-normalisation): ``[N, d]``."""
    if embeddings.ndim != 3:
        raise ValueError(f"expected embeddings [N, n_views, d], got {tuple(embeddings.shape)}")
    return F.normalize(embeddings.float(), dim=2).mean(dim=1)


@ATTACKS.register
class RDA(EncoderAttack):
    """Sample-wise prototypes queried once, then query-free multi-relational training."""

    name = "rda"
    paper = "Wu et al., Refine, Discriminate and Align, ECCV 2024"
    Params = RDAParams
    params: RDAParams

    def queries_per_sample(self) -> int:
        return self.params.n_views

    def prototypes(self, oracle: EmbedOracle, samples: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
        """Query the victim on ``n_views`` views of every sample; returns (prototypes [N, d], the raw
        embeddings [N, n_views, d])."""
        generator = torch.Generator().manual_seed(self.params.seed)
        views = self.make_views(
            samples.images, self.params.n_views, view_generator(self.params.prototype_view), generator
        )
        embeddings = self.query(oracle, views)
        return build_prototypes(embeddings), embeddings

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
        prototypes, _ = self.prototypes(oracle, samples)
        query_seconds = time.perf_counter() - started

        surrogate = self.build_surrogate(pool, prototypes.shape[1]).to(device)
        targets = prototypes.to(device)
        views = view_generator(p.train_view)

        def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x = batch_to_device(samples.images[batch], device)
            v = views.views(x, p.train_views, generator)
            with autocast(device):
                z = net(v.reshape(-1, *x.shape[1:]))
            z = F.normalize(z.float(), dim=1).view(p.train_views, len(batch), -1)
            y = targets[batch.to(device)]
            losses = [rda_loss(z[i], y, p.temperature, p.alpha, p.beta) for i in range(p.train_views)]
            return torch.stack(losses).mean()

        history, train_seconds = self.train(surrogate, len(samples), step, device, progress)
        return StealingResult(
            surrogate=surrogate.cpu(),
            history=history,
            samples=len(samples),
            queries=len(samples) * p.n_views,
            query_seconds=query_seconds,
            train_seconds=train_seconds,
            extra={"prototype_norm_mean": float(prototypes.norm(dim=1).mean())},
        )

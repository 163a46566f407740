"""Cont-Steal queried once: "Can't Steal? Cont-Steal! Contrastive Stealing Attacks Against Image
Encoders" (Sha et al., CVPR 2023), with the victim queried once per view before training.

Not the released schedule: RDA's released ``Con-Steal.py`` (ShuchiWu/RDA) queries the victim on a
fresh augmented view of every sample at every step, which is ``cont_steal``
(:mod:`attacker_client.attacks.cont_steal`). This variant (this project's earlier ``cont_steal``)
spends its queries up front, as RDA's prototypes do, so the two can be compared at equal queries.

The victim embeds ``query_views`` (default 1) augmented views of each query sample, once, before
training (queries = N x ``query_views``, N = budget // ``query_views`` capped by the pool). Each step
pairs a fresh augmented view of every sample, embedded by the surrogate, with one of that sample's
victim embeddings (drawn at random when there are several); both are L2-normalised and trained with
:func:`attacker_client.attacks.losses.cont_steal_loss`. Its cross negatives are anchored at the
surrogate embedding by default (``cross_anchor="surrogate"``: RDA's Discriminate term, this
variant's earlier loss); ``"victim"`` gives the released Con-Steal form. Views are SimCLR's;
temperature 0.07 (RDA's value, a parameter here).
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
from attacker_client.attacks.losses import cont_steal_loss
from common.datasets import ImageData
from common.devices import autocast
from common.training import batch_to_device


class ContStealOnceParams(EncoderAttackParams):
    """Hyper-parameters of Cont-Steal queried once."""

    query_views: int = Field(1, ge=1, description="augmented views per sample the victim embeds")
    temperature: float = Field(0.07, gt=0, description="contrastive temperature")
    query_view: ViewPreset = Field("simclr", description="views the victim embeds")
    train_view: ViewPreset = Field("simclr", description="views the surrogate trains on")
    cross_anchor: Literal["surrogate", "victim"] = Field(
        "surrogate", description="which embedding the cross negatives are anchored at"
    )


@ATTACKS.register
class ContStealOnce(EncoderAttack):
    """Contrastive stealing against victim embeddings queried once, before training."""

    name = "cont_steal_once"
    paper = "Sha et al., Can't Steal? Cont-Steal!, CVPR 2023 (victim queried once)"
    Params = ContStealOnceParams
    params: ContStealOnceParams

    def queries_per_sample(self) -> int:
        return self.params.query_views

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
        generator = torch.Generator().manual_seed(p.seed)
        queried = self.make_views(samples.images, p.query_views, view_generator(p.query_view), generator)
        victim = F.normalize(self.query(oracle, queried), dim=2)  # [N, query_views, d]
        query_seconds = time.perf_counter() - started

        surrogate = self.build_surrogate(pool, victim.shape[2]).to(device)
        targets = victim.to(device)
        views = view_generator(p.train_view)

        def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x = batch_to_device(samples.images[batch], device)
            v = views(x, generator)
            with autocast(device):
                z = F.normalize(net(v).float(), dim=1)
            pick = torch.randint(p.query_views, (len(batch),), generator=generator)
            y = targets[batch.to(device), pick.to(device)]
            return cont_steal_loss(z, y, p.temperature, p.cross_anchor)

        history, train_seconds = self.train(surrogate, len(samples), step, device, progress)
        return StealingResult(
            surrogate=surrogate.cpu(),
            history=history,
            samples=len(samples),
            queries=len(samples) * p.query_views,
            query_seconds=query_seconds,
            train_seconds=train_seconds,
        )

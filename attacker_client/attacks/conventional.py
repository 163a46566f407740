"""Conventional end-to-end encoder stealing: query the victim on fresh augmented views every epoch.

The common baseline of the encoder-stealing papers (e.g. the "conventional" attack in RDA, Wu et
al., ECCV 2024, and in StolenEncoder, Liu et al., CCS 2022): at the start of every epoch each query
sample gets one fresh augmented view, the victim embeds it, and the surrogate is trained to map the
same view to the victim's embedding (mean squared error, or negative cosine). Nothing is reused
across epochs, so the queries are N x epochs: at a fixed budget the attack can afford only
N = budget // epochs samples. That is the query cost RDA's query-once prototypes avoid.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
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
from attacker_client.attacks.stolen_encoder import embedding_distance
from common import distributed
from common.datasets import ImageData
from common.devices import autocast
from common.training import batch_to_device, batches_per_epoch


class ConventionalParams(EncoderAttackParams):
    """Parameters of end-to-end stealing (queries = samples x epochs)."""

    loss: Literal["mse", "cosine"] = Field("mse", description="distance between embeddings")
    view: ViewPreset = Field("stolen_encoder", description="the per-epoch augmentation")


class _EpochQueries:
    """The current epoch's views and the victim's embeddings of them, fetched when an epoch starts
    (each epoch's views come from a generator seeded by (seed, epoch))."""

    def __init__(
        self, attack: EncoderAttack, oracle: EmbedOracle, samples: ImageData, view: ViewPreset
    ) -> None:
        self.attack, self.oracle, self.samples = attack, oracle, samples
        self.views = view_generator(view)
        self.epoch = -1
        self.images = torch.empty(0)
        self.targets = torch.empty(0)
        self.queries = 0
        self.seconds: list[float] = []

    def at(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(views [N, C, H, W] uint8, victim embeddings [N, d]) of ``epoch``."""
        if epoch != self.epoch:
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(self.attack.params.seed * 1_000_003 + epoch)
            self.images = self.attack.make_views(self.samples.images, 1, self.views, generator)[:, 0]
            self.targets = self.attack.query(self.oracle, self.images)
            self.queries += len(self.images)
            self.epoch = epoch
            self.seconds.append(time.perf_counter() - started)
        return self.images, self.targets


@ATTACKS.register
class Conventional(EncoderAttack):
    """Fresh victim queries every epoch; surrogate regresses the victim's embedding of each view."""

    name = "conventional"
    paper = "end-to-end baseline (as in Liu et al., CCS 2022; Wu et al., ECCV 2024)"
    Params = ConventionalParams
    params: ConventionalParams

    def queries_per_sample(self) -> int:
        return self.params.epochs

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
        per_epoch = _EpochQueries(self, oracle, samples, p.view)
        steps_per_epoch = batches_per_epoch(len(samples) // distributed.current().world_size, p.batch_size)
        _, first_targets = per_epoch.at(0)  # its width is the surrogate's
        surrogate = self.build_surrogate(pool, first_targets.shape[1]).to(device)
        steps = [0]

        def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            images, targets = per_epoch.at(steps[0] // steps_per_epoch)
            steps[0] += 1
            x = batch_to_device(images[batch], device)
            with autocast(device):
                z = net(x)
            return embedding_distance(z, targets[batch].to(device), p.loss)

        history, seconds = self.train(surrogate, len(samples), step, device, progress)
        return StealingResult(
            surrogate=surrogate.cpu(),
            history=history,
            samples=len(samples),
            queries=per_epoch.queries,
            query_seconds=sum(per_epoch.seconds),
            train_seconds=seconds - sum(per_epoch.seconds[1:]),
        )

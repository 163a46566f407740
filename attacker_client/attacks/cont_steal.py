"""Cont-Steal baseline: "Can't Steal? Cont-Steal! Contrastive Stealing Attacks Against Image
Encoders" (Sha et al., CVPR 2023), as RDA's released code runs it (``Con-Steal.py`` in
ShuchiWu/RDA, the baseline of Wu et al., ECCV 2024): the victim is queried on fresh views at every
step.

Every training step takes a batch of query samples and makes two independent augmented views of
each: the victim embeds the first (one paid query per sample per step), the surrogate the second;
both embeddings are L2-normalised and trained with the contrastive loss of
:func:`attacker_client.attacks.losses.cont_steal_loss` (temperature 0.07). Nothing is reused
across steps, so the queries grow with the steps: a full run costs up to ``epochs`` queries per
sample (one fresh view per sample per epoch; the last partial batch of an epoch is dropped, as
the released ``drop_last=True`` loader does).

Defaults, as released: both views RDA's training view (``query_pair_cifar10_transform``:
:meth:`common.views.ViewConfig.rda_train`); the cross negatives anchored at the victim embedding
(``cross_anchor="victim"``: ``ConStealLoss(x=victim, y=surrogate)``, negatives ``exp(v_i.s_j / t)``
and ``exp(s_i.s_j / t)``); Adam lr 1e-3, weight decay 1e-4, batch 100, 100 epochs.
``cross_anchor="surrogate"`` anchors the cross negatives at the surrogate embedding (RDA's
Discriminate term, ``exp(s_i.v_j / t)``).

The budget (RDA's scripts fix 2,500 query samples and let the queries follow; a range fixes the
queries): :meth:`ContSteal.samples_for` picks the largest number of samples N whose whole schedule
(``epochs`` epochs, or ``max_steps`` steps when that comes first, under data parallelism on every
rank) fits in the budget, so the attack stops when its schedule ends and never spends more than
its budget; a guard raises before any query past it. With ``max_steps`` cutting the run short, N
may be the whole pool and the run spend less than the budget.

The once-queried variant (the victim's embeddings of each sample fetched before training) is
``cont_steal_once`` (:mod:`attacker_client.attacks.cont_steal_once`).

Every victim view is made on the CPU from a generator seeded by the attack's seed (the same on every
rank), so a rerun asks for the same bytes and the client's cache answers it. Under ``torchrun`` the
ranks gather their batches' indices and every rank asks the oracle for the same images (the
oracle's answer comes from rank 0), then keeps its own rows.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.distributed as dist
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
from common import distributed
from common.datasets import ImageData
from common.devices import autocast
from common.training import batch_to_device, batches_per_epoch, split_batches


class ContStealParams(EncoderAttackParams):
    """Cont-Steal's hyper-parameters (RDA's released baseline code defaults)."""

    temperature: float = Field(0.07, gt=0, description="contrastive temperature")
    query_view: ViewPreset = Field("rda_train", description="views the victim embeds (fresh every step)")
    train_view: ViewPreset = Field("rda_train", description="views the surrogate trains on")
    cross_anchor: Literal["victim", "surrogate"] = Field(
        "victim", description="which embedding the cross negatives are anchored at (released: victim)"
    )


class _StepQueries:
    """The victim's embeddings of fresh views of each step's batch, counted against the budget."""

    def __init__(self, attack: ContSteal, oracle: EmbedOracle, samples: ImageData, budget: int) -> None:
        self.attack, self.oracle, self.samples, self.budget = attack, oracle, samples, budget
        self.views = view_generator(attack.params.query_view)
        # One stream for every victim view, seeded alike on every rank (they ask the same images).
        self.generator = torch.Generator().manual_seed(attack.params.seed * 1_000_003 + 17)
        self.queries = 0
        self.seconds = 0.0
        self.steps = 0
        self.prefetched: tuple[torch.Tensor, torch.Tensor] | None = None

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        """Victim embeddings [n, d] (L2-normalised) of one fresh view of each sample in ``indices``."""
        if self.queries + len(indices) > self.budget:
            raise RuntimeError(
                f"cont_steal: {self.queries} queries spent, {len(indices)} more would pass the budget "
                f"of {self.budget}"
            )
        started = time.perf_counter()
        images = self.attack.make_views(self.samples.images[indices], 1, self.views, self.generator)[:, 0]
        embeddings = F.normalize(self.attack.query(self.oracle, images), dim=1)
        self.queries += len(indices)
        self.seconds += time.perf_counter() - started
        return embeddings

    def prefetch(self, indices: torch.Tensor) -> int:
        """Fetch the first step's targets before training (their width sizes the surrogate)."""
        self.prefetched = (indices, self.fetch(indices))
        return int(self.prefetched[1].shape[1])

    def at_step(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's targets for this step's ``batch`` (every rank asks for the global batch)."""
        context = distributed.current()
        indices, mine = batch.cpu(), slice(0, len(batch))
        if context.enabled:
            parts: list[torch.Tensor | None] = [None] * context.world_size
            dist.all_gather_object(parts, indices)
            start = sum(len(p) for p in parts[: context.rank] if p is not None)
            indices = torch.cat([p for p in parts if p is not None])
            mine = slice(start, start + len(batch))
        if self.steps == 0 and self.prefetched is not None and torch.equal(self.prefetched[0], indices):
            targets = self.prefetched[1]
        else:
            targets = self.fetch(indices)
        self.prefetched = None
        self.steps += 1
        return targets[mine]


@ATTACKS.register
class ContSteal(EncoderAttack):
    """Contrastive stealing with the victim queried on fresh views at every step (as released)."""

    name = "cont_steal"
    paper = "Sha et al., Can't Steal? Cont-Steal!, CVPR 2023"
    Params = ContStealParams
    params: ContStealParams

    def queries_per_sample(self) -> int:
        """At most one fresh view per sample per epoch: ``epochs`` (a run cut by ``max_steps`` or by
        dropped partial batches asks less; :meth:`samples_for` counts it exactly)."""
        return self.params.epochs

    def planned_queries(self, n_samples: int) -> int:
        """The queries a run on ``n_samples`` samples asks for: steps x batch x ranks."""
        p = self.params
        context = distributed.current()
        per_rank = n_samples // context.world_size
        if per_rank < 1:
            return 0
        steps = p.epochs * batches_per_epoch(per_rank, p.batch_size)
        if p.max_steps is not None:
            steps = min(steps, p.max_steps)
        return steps * min(p.batch_size, per_rank) * context.world_size

    def samples_for(self, budget: int, pool_size: int) -> int:
        """The most query samples (up to the pool) whose whole schedule fits in ``budget``."""
        if budget < 1:
            raise ValueError(f"budget must be >= 1 query, got {budget}")
        smallest = 2 * distributed.current().world_size  # a contrastive batch needs 2 per rank
        if pool_size < smallest or self.planned_queries(smallest) > budget:
            raise ValueError(
                f"{self.name}: a budget of {budget} queries does not buy {self.params.epochs} epochs of "
                f"fresh views of {smallest} query samples (a plan of {self.planned_queries(smallest)} "
                f"queries; a pool of {pool_size})"
            )
        low, high = smallest, pool_size  # planned_queries never decreases with the samples
        while low < high:
            mid = (low + high + 1) // 2
            if self.planned_queries(mid) <= budget:
                low = mid
            else:
                high = mid - 1
        return low

    def first_batch(self, n_samples: int) -> torch.Tensor:
        """The global indices of the first step's batch, drawn as :func:`common.training.run_steps`
        draws its first epoch (a permutation from a generator seeded by the seed, sharded by rank)."""
        p = self.params
        context = distributed.current()
        order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(p.seed))
        parts = []
        for rank in range(context.world_size):
            shard = distributed.shard(order, distributed.DistributedContext(rank, context.world_size))
            parts.append(split_batches(shard, p.batch_size)[0])
        return torch.cat(parts)

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
        queries = _StepQueries(self, oracle, samples, budget)
        dim = queries.prefetch(self.first_batch(len(samples)))
        before_training = queries.seconds
        surrogate = self.build_surrogate(pool, dim).to(device)
        views = view_generator(p.train_view)

        def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            y = queries.at_step(batch).to(device)
            x = batch_to_device(samples.images[batch], device)
            v = views(x, generator)
            with autocast(device):
                z = F.normalize(net(v).float(), dim=1)
            return cont_steal_loss(z, y, p.temperature, p.cross_anchor)

        history, seconds = self.train(surrogate, len(samples), step, device, progress)
        return StealingResult(
            surrogate=surrogate.cpu(),
            history=history,
            samples=len(samples),
            queries=queries.queries,
            query_seconds=queries.seconds,
            train_seconds=seconds - (queries.seconds - before_training),
            extra={"query_steps": queries.steps},
        )

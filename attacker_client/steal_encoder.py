"""One encoder-stealing run over the network: what ``stealrange attack <name>`` does.

1. Read the victim's metadata through the API (input shape, embedding width, version).
2. Read the key's usage, run the attack with :meth:`VictimClient.embed` as its oracle (binary
   tensors, chunked, retried, every answered image cached on disk in ``out/query_cache.sqlite``),
   read the usage again: the queries spent are the server's count, not the attacker's.
3. Save the surrogate (``out/surrogate/``: safetensors + card) and evaluate it
   (:mod:`attacker_client.evaluate`), next to the victim's white-box checkpoint when one is given
   (or found in the local model store with the served version's digest) and next to an untrained
   surrogate of the same architecture.
4. Write ``out/result.json`` from the typed result (:class:`EncoderRunResult`), which it returns.

Re-running the same command asks the same images (seeded views made on the CPU), which the cache
answers: it spends zero new queries.

Under ``torchrun`` (``torchrun --nproc_per_node N --no-python stealrange attack ...``) every rank runs
the attack with the same seed, but only rank 0 holds a client: the metadata, the usage and every
oracle answer are fetched by rank 0 and broadcast (:func:`common.distributed.broadcast_call`), so the
budget is spent once; the surrogate trains data-parallel (DDP), and rank 0 alone evaluates it and
writes the result (the other ranks return ``None``).

The ``encoder`` family (:mod:`attacker_client.families`): :class:`EncoderStealingConfig`,
:func:`steal_encoder`, :class:`attacker_client.evaluate.EvalConfig`, :class:`EncoderRunResult`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from rich.console import RenderableType
from rich.table import Table

from attacker_client.attacks import EncoderAttack, build_attack
from attacker_client.attacks.base import StealingResult
from attacker_client.client import VictimClient
from attacker_client.evaluate import EncoderEvaluation, EvalConfig, evaluate_stealing
from attacker_client.no_query import train_no_query_alternative
from attacker_client.runs import (
    SURROGATE_DIR,
    ReferenceCache,
    ReportRow,
    RunResult,
    RunSeconds,
    StealingRunConfig,
    VictimInfo,
    find_victim_checkpoint,
    fmt,
    open_victim_client,
    package_versions,
    queries_record,
    query_pool,
    run_fields,
    version_of,
    victim_input,
)
from common import distributed
from common.checkpoints import InputSpec, card_for, load_checkpoint, save_checkpoint
from common.datasets import ImageData
from common.devices import seed_everything
from common.models import ImageModel
from common.training import batches_per_epoch


class EncoderStealingConfig(StealingRunConfig):
    """Everything one run needs; the CLI and the range build it."""

    attack: str = "rda"
    query_set: str = "mnist5k"
    query_split: str = "train"
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    untrained_reference: bool = Field(True, description="also score an untrained surrogate")
    no_query_reference: bool = Field(
        True,
        description="also score the attacker's no-query alternative: the surrogate architecture trained "
        "with SimCLR on its own pool with the attack's compute (attacker_client/no_query.py)",
    )


class EncoderVictimInfo(VictimInfo):
    """An encoder victim: also its embedding width."""

    embedding_dim: int | None


def _first(scores: dict[str, dict[str, float]] | None, metric: str) -> float | None:
    """``metric`` on the first downstream set (the victim's own task comes first by default)."""
    if not scores:
        return None
    return next(iter(scores.values())).get(metric)


class EncoderRunResult(RunResult):
    """What an encoder-stealing run records (``result.json``) and what the report reads from it."""

    family: Literal["encoder"] = "encoder"
    victim: EncoderVictimInfo
    evaluation: EncoderEvaluation
    history: list[dict[str, Any]]
    extra: dict[str, Any]
    world_size: int
    checkpoint: str

    success_label = "cosine fidelity to the victim"
    quality_label = "linear probe accuracy"
    legend = (
        "for an encoder victim, the surrogate's linear-probe accuracy / the victim's on the first "
        "downstream set and the surrogate's cosine fidelity to the victim's embeddings on held-out images"
    )

    @property
    def success(self) -> float | None:
        fidelity = self.evaluation.fidelity
        return None if fidelity is None else fidelity.cosine

    @property
    def quality(self) -> float | None:
        return _first(self.evaluation.surrogate, "linear_probe")

    @property
    def victim_quality(self) -> float | None:
        return _first(self.evaluation.victim, "linear_probe")

    invariant_success_label: ClassVar[str] = "linear CKA to the victim"

    @property
    def invariant_success(self) -> float | None:
        """Linear CKA of the surrogate's embeddings to the victim's on held-out images: unchanged by
        B4B's per-key map (rotation x dimension shuffle x isotropic scale + shift: CKA's exact
        invariance class), where cosine reads "another space". CKA rather than the linear map's R^2
        (reported beside it): it fits nothing, so 500 held-out images of 512-dimensional embeddings
        (the quick profile) do not leave it an underdetermined fit; it is symmetric and in [0, 1].
        None when the victim's checkpoint was absent or the result predates it."""
        fidelity = self.evaluation.fidelity
        return None if fidelity is None else fidelity.cka

    @property
    def baseline_quality(self) -> float | None:
        """The no-query alternative's linear probe on the first downstream set."""
        return _first(self.evaluation.no_query, "linear_probe")

    @property
    def stealing_gain(self) -> float | None:
        """Surrogate minus the no-query alternative (linear probe, first downstream set)."""
        if self.quality is None or self.baseline_quality is None:
            return None
        return self.quality - self.baseline_quality

    def cell_text(self, budget: str) -> str:
        return f"{budget}: {fmt(self.quality)} / {fmt(self.victim_quality)}, cos {fmt(self.success)}"

    @classmethod
    def report_notes(cls, rows: Sequence[ReportRow]) -> list[str]:
        """The cosine an untrained surrogate scores: the floor of the fidelity column."""
        untrained = [
            row.result.evaluation.untrained_fidelity.cosine
            for row in rows
            if row.result.evaluation.untrained_fidelity is not None
        ]
        if not untrained:
            return []
        return ["", f"An untrained surrogate scores cos {min(untrained):.3f}-{max(untrained):.3f}."]

    def summary(self) -> list[RenderableType]:
        evaluation = self.evaluation
        table = Table(
            "set", "metric", "surrogate", "victim", "untrained", "surrogate/victim", title=self.attack
        )
        for dataset, scores in evaluation.surrogate.items():
            for metric, value in scores.items():
                victim = (evaluation.victim or {}).get(dataset, {}).get(metric)
                untrained = (evaluation.untrained or {}).get(dataset, {}).get(metric)
                table.add_row(
                    dataset,
                    metric,
                    f"{value:.4f}",
                    fmt(victim, 4),
                    fmt(untrained, 4),
                    "-" if not victim else f"{value / victim:.3f}",
                )
        cosine = float("nan") if self.success is None else self.success
        line = (
            f"{self.queries_line()}; cosine fidelity: {cosine:.4f}; "
            f"{self.seconds.total:.0f} s on {self.device}"
        )
        return [table, line]


def attack_steps(attack: EncoderAttack, result: StealingResult) -> int:
    """Optimizer steps the attack's training took (its compute, which the no-query alternative gets)."""
    cfg = attack.params.train_config(torch.device("cpu"))
    total = cfg.epochs * batches_per_epoch(result.samples, cfg.batch_size, cfg.drop_last)
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def evaluate_references(
    config: EncoderStealingConfig,
    attack: EncoderAttack,
    surrogate: ImageModel,
    spec: InputSpec,
    pool: ImageData,
    victim: ImageModel | None,
    version: str,
    untrained: ImageModel | None,
    steps: int,
    device: torch.device,
) -> EncoderEvaluation:
    """:func:`evaluate_stealing` with the references: the victim, an untrained surrogate and the
    no-query alternative (trained here for the attack's ``steps``, unless known). Their scores do
    not change from run to run, so with ``config.reference_cache`` each is measured once per key
    (what it depends on) and reused."""
    cache = ReferenceCache(config.reference_cache) if config.reference_cache is not None else None
    p = attack.params
    evaluation_key = config.evaluation.model_dump(mode="json", exclude={"data_root"})
    surrogate_key = {"architecture": p.architecture, "dim": surrogate.feature_dim, "seed": p.seed}
    train = p.train_config(device).model_copy(update={"epochs": 10**6, "max_steps": max(1, steps)})
    keys: dict[str, dict[str, Any]] = {
        # the served version is the weights' digest: the same behind every defense of a range
        "victim": {"role": "victim", "version": version, "eval": evaluation_key},
        "untrained": {"role": "untrained", **surrogate_key, "eval": evaluation_key},
        "no_query": {
            "role": "no_query",
            **surrogate_key,
            "pool": [config.query_set, config.query_split, len(pool)],
            "train": train.model_dump(mode="json", include={"batch_size", "lr", "optimizer", "max_steps"}),
            "eval": evaluation_key,
        },
    }
    known: dict[str, Any] = {}
    if cache is not None:
        known = {role: v for role, key in keys.items() if (v := cache.get(key)) is not None}
    if victim is None:
        known.pop("victim", None)
    no_query = None
    if config.no_query_reference and "no_query" not in known:
        with distributed.local_only():  # rank 0 alone under torchrun: the others have finished
            no_query = train_no_query_alternative(
                pool, p.architecture, surrogate.feature_dim, train, config.progress
            )
    evaluation = evaluate_stealing(
        surrogate, spec, config.evaluation, victim, untrained, device, no_query=no_query, known=known
    )
    if cache is not None:
        for role, key in keys.items():
            scores = getattr(evaluation, role)
            if scores is not None and role not in known:
                cache.put(key, scores)
    if config.no_query_reference and evaluation.no_query is None and "no_query" in known:
        evaluation = evaluation.model_copy(update={"no_query": known["no_query"]})
    return evaluation


def steal_encoder(config: EncoderStealingConfig) -> EncoderRunResult | None:
    """Run the attack of ``config`` against the victim API; returns (and writes) the result.

    Under ``torchrun`` the other ranks return ``None`` once training ends.
    """
    started = time.perf_counter()
    context, device = distributed.init_from_env(config.device)
    attack = build_attack(config.attack, config.params, EncoderAttack)
    seed_everything(attack.params.seed)
    out = Path(config.out)

    with contextlib.ExitStack() as stack:
        client: VictimClient | None = None
        if context.is_main:
            out.mkdir(parents=True, exist_ok=True)
            client = stack.enter_context(open_victim_client(config, out))

        def on_main(fn: Any) -> Any:
            """``fn(client)`` run by rank 0, its result given to every rank."""
            return distributed.broadcast_call(lambda: fn(client), context)

        def oracle(images: np.ndarray) -> np.ndarray:
            return on_main(lambda c: c.embed(config.model, images))

        metadata = on_main(lambda c: c.model_metadata(config.model))
        spec = victim_input(metadata, config.model, "encoder")
        version = version_of(metadata)
        pool = query_pool(config.query_set, config.query_split, spec, config.data_root)
        before = on_main(lambda c: c.usage())
        result = attack.steal(oracle, pool, config.budget, device, config.progress)
        after = on_main(lambda c: c.usage())
        sent = on_main(lambda c: c.images_sent)

    if not context.is_main:
        return None

    surrogate = result.surrogate
    victim: ImageModel | None = None
    victim_path = find_victim_checkpoint(config.victim_checkpoint, config.victim_store, config.model, version)
    if victim_path is not None:
        victim, _ = load_checkpoint(victim_path, device)
    untrained = attack.build_surrogate(pool, surrogate.feature_dim) if config.untrained_reference else None
    evaluation = evaluate_references(
        config,
        attack,
        surrogate,
        spec,
        pool,
        victim,
        version,
        untrained,
        attack_steps(attack, result),
        device,
    )

    name = f"{attack.name.replace('_', '-')}-{config.model}"[:64]
    card = card_for(
        surrogate,
        name,
        attack.params.architecture,
        input=spec,
        dataset=config.query_set,
        description=f"surrogate of {config.model} stolen by {attack.name} (budget {config.budget})",
        metrics={
            f"{dataset}.{metric}": value
            for dataset, scores in evaluation.surrogate.items()
            for metric, value in scores.items()
        },
        training={"attack": attack.name, "params": attack.params.model_dump(mode="json")},
    )
    save_checkpoint(surrogate, card, out / SURROGATE_DIR)

    record = EncoderRunResult(
        **run_fields(
            config,
            attack,
            version,
            spec,
            metadata,
            victim_path,
            len(pool),
            EncoderVictimInfo,
            embedding_dim=metadata.get("embedding_dim"),
        ),
        samples=result.samples,
        queries=queries_record(result.queries, before, after, sent),
        evaluation=evaluation,
        history=result.history,
        extra=result.extra,
        seconds=RunSeconds(
            query=result.query_seconds,
            train=result.train_seconds,
            evaluate=evaluation.seconds,
            total=time.perf_counter() - started,
        ),
        device=str(device),
        world_size=context.world_size,
        checkpoint=str(out / SURROGATE_DIR),
        versions=package_versions(),
    )
    record.write(out)
    return record

"""One encoder-stealing run over the network: what ``stealrange attack <name>`` does.

1. Read the victim's metadata through the API (input shape, embedding width, version).
2. Read the key's usage, run the attack with :meth:`VictimClient.embed` as its oracle (binary
   tensors, chunked, retried, every answered image cached on disk in ``out/query_cache.sqlite``),
   read the usage again: the queries spent are the server's count, not the attacker's.
3. Save the surrogate (``out/surrogate/``: safetensors + card) and evaluate it
   (:mod:`attacker_client.evaluate`), next to the victim's white-box checkpoint when one is given
   (or found in the local model store with the served version's digest) and next to an untrained
   surrogate of the same architecture.
4. Write ``out/result.json``.

Re-running the same command asks the same images (seeded views made on the CPU), which the cache
answers: it spends zero new queries.

Under ``torchrun`` (``torchrun --nproc_per_node N --no-python stealrange attack ...``) every rank runs
the attack with the same seed, but only rank 0 holds a client: the metadata, the usage and every
oracle answer are fetched by rank 0 and broadcast (:func:`common.distributed.broadcast_call`), so the
budget is spent once; the surrogate trains data-parallel (DDP), and rank 0 alone evaluates it and
writes the result.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from attacker_client.attacks import build_attack
from attacker_client.client import VictimClient
from attacker_client.evaluate import EvalConfig, evaluate_stealing
from attacker_client.runs import (
    RESULT_FILE,
    SURROGATE_DIR,
    StealingRunConfig,
    find_victim_checkpoint,
    open_victim_client,
    package_versions,
    queries_record,
    query_pool,
    victim_input,
)
from common import distributed
from common.checkpoints import card_for, load_checkpoint, save_checkpoint
from common.devices import seed_everything
from common.models import ImageModel


class EncoderStealingConfig(StealingRunConfig):
    """Everything one run needs; the CLI and the range build it."""

    attack: str = "rda"
    query_set: str = "mnist5k"
    query_split: str = "train"
    victim_checkpoint: Path | None = None
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    untrained_reference: bool = Field(True, description="also score an untrained surrogate")


def steal_encoder(config: EncoderStealingConfig) -> dict[str, Any]:
    """Run the attack of ``config`` against the victim API; returns (and writes) the result.

    Under ``torchrun`` the other ranks return ``{"rank": r, "world_size": n}`` once training ends.
    """
    started = time.perf_counter()
    context, device = distributed.init_from_env(config.device)
    attack = build_attack(config.attack, config.params)
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
        version = (metadata.get("versions") or [""])[0]
        pool = query_pool(config.query_set, config.query_split, spec, config.data_root)
        before = on_main(lambda c: c.usage())
        result = attack.steal(oracle, pool, config.budget, device, config.progress)
        after = on_main(lambda c: c.usage())
        sent = on_main(lambda c: c.images_sent)

    if not context.is_main:
        return {"rank": context.rank, "world_size": context.world_size}

    surrogate = result.surrogate
    victim: ImageModel | None = None
    victim_path = find_victim_checkpoint(config.victim_checkpoint, config.model, version)
    if victim_path is not None:
        victim, _ = load_checkpoint(victim_path, device)
    untrained = attack.build_surrogate(pool, surrogate.feature_dim) if config.untrained_reference else None
    evaluation = evaluate_stealing(surrogate, spec, config.evaluation, victim, untrained, device)

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
            for dataset, scores in evaluation["surrogate"].items()
            for metric, value in scores.items()
        },
        training={"attack": attack.name, "params": attack.params.model_dump(mode="json")},
    )
    save_checkpoint(surrogate, card, out / SURROGATE_DIR)

    record: dict[str, Any] = {
        "attack": attack.name,
        "paper": attack.paper,
        "params": attack.params.model_dump(mode="json"),
        "victim": {
            "url": config.url,
            "model": config.model,
            "version": version,
            "input": list(spec.shape),
            "embedding_dim": metadata.get("embedding_dim"),
            "reported_metrics": metadata.get("metrics", {}),
            "checkpoint": str(victim_path) if victim_path else None,
        },
        "query_set": {"name": config.query_set, "split": config.query_split, "pool_size": len(pool)},
        "budget": config.budget,
        "samples": result.samples,
        "queries": queries_record(result.queries, before, after, sent),
        "evaluation": evaluation,
        "history": result.history,
        "extra": result.extra,
        "seconds": {
            "query": result.query_seconds,
            "train": result.train_seconds,
            "evaluate": evaluation["seconds"],
            "total": time.perf_counter() - started,
        },
        "device": str(device),
        "world_size": context.world_size,
        "checkpoint": str(out / SURROGATE_DIR),
        "versions": package_versions(),
    }
    (out / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record

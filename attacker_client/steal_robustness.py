"""One robustness-stealing run over the network: ``stealrange attack rrm``.

1. Read the victim encoder's metadata (input shape, embedding width), the attacker's labelled pool
   (``--query-set``, default the Fashion-MNIST pool the quick victims never trained on).
2. Read the key's usage, ask the victim for the representations of ``budget`` pool images (one query
   each, binary tensors, cached), read the usage again.
3. Train the Robust Representation Matching student (:mod:`attacker_client.attacks.rrm`); then, on
   the same images and labels, the PGD adversarial training reference and a plain student (no
   queries).
4. Score each on held-out test images of the victim's dataset: clean accuracy and PGD accuracy
   (L-inf, the reference's eps, 20 steps of eps / 4, random start), with training times; write
   ``out/students/<name>/`` checkpoints and ``out/result.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from attacker_client.attacks.rrm import RobustRepresentationMatching, StudentRun
from attacker_client.runs import (
    RESULT_FILE,
    StealingRunConfig,
    open_victim_client,
    package_versions,
    queries_record,
    query_pool,
    victim_input,
)
from common.adversarial import robust_accuracy
from common.checkpoints import card_for, save_checkpoint
from common.datasets import get_dataset
from common.devices import resolve_device, seed_everything
from common.metrics import accuracy
from common.training import predict

STUDENTS_DIR = "students"


class RobustnessStealingConfig(StealingRunConfig):
    """Everything one RRM run needs."""

    test_size: int = Field(1000, ge=10)
    eval_steps: int = Field(20, ge=1, description="PGD steps of the robustness evaluation")
    references: bool = Field(True, description="also train the PGD-AT and plain references")


def score(
    run: StudentRun, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int
) -> dict[str, float]:
    """Clean and PGD accuracy of a student, and its training seconds."""
    return {
        "clean_accuracy": accuracy(predict(run.model, images), labels),
        "pgd_accuracy": robust_accuracy(
            run.model,
            images,
            labels,
            eps=eps,
            step_size=eps / 4,
            steps=steps,
            generator=torch.Generator().manual_seed(0),
        ),
        "train_seconds": run.seconds,
    }


def steal_robustness(config: RobustnessStealingConfig) -> dict[str, Any]:
    """Run RRM against the victim API and its references; returns (and writes) the result."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    attack = RobustRepresentationMatching(config.params)  # type: ignore[arg-type]
    seed_everything(attack.params.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with open_victim_client(config, out) as client:
        metadata = client.model_metadata(config.model)
        spec = victim_input(metadata, config.model, "encoder", ": RRM needs its embedding endpoint")
        channels, height, width = spec.shape
        pool = query_pool(config.query_set, config.query_split, spec, config.data_root)
        before = client.usage()

        def oracle(images: np.ndarray) -> np.ndarray:
            return client.embed(config.model, images)

        rrm, samples, query_seconds = attack.steal(oracle, pool, config.budget, device, config.progress)
        after = client.usage()
        sent = client.images_sent

    dataset = metadata.get("dataset") or config.query_set
    test = get_dataset(dataset, "test", root=config.data_root).adapt(channels, (height, width))
    test = test.subset(torch.arange(min(len(test), config.test_size)))
    eps = attack.params.at_eps
    runs = {"rrm": rrm}
    if config.references:
        dim = int(metadata["embedding_dim"])
        runs["pgd_at"] = attack.adversarial_reference(samples, dim, device, config.progress)
        runs["plain"] = attack.plain_reference(samples, dim, device, config.progress)
    students = {
        name: score(run, test.images, test.labels, eps, config.eval_steps) for name, run in runs.items()
    }
    for name, run in runs.items():
        card = card_for(
            run.model.cpu(),
            f"{name.replace('_', '-')}-student",
            attack.params.architecture,
            input=spec,
            classes=list(samples.classes),
            dataset=config.query_set,
            metrics=students[name],
            training={"attack": "rrm", "student": name, "params": attack.params.model_dump(mode="json")},
        )
        save_checkpoint(run.model, card, out / STUDENTS_DIR / name)
    ratios: dict[str, float] = {}
    if "pgd_at" in students:
        at = students["pgd_at"]
        ratios = {
            "pgd_accuracy_vs_pgd_at": students["rrm"]["pgd_accuracy"] / max(at["pgd_accuracy"], 1e-12),
            "train_time_vs_pgd_at": students["rrm"]["train_seconds"] / max(at["train_seconds"], 1e-12),
        }
    record: dict[str, Any] = {
        "kind": "robustness",
        "attack": attack.name,
        "paper": attack.paper,
        "params": attack.params.model_dump(mode="json"),
        "victim": {
            "url": config.url,
            "model": config.model,
            "version": (metadata.get("versions") or [""])[0],
            "reported_metrics": metadata.get("metrics", {}),
        },
        "query_set": {"name": config.query_set, "split": config.query_split, "pool_size": len(pool)},
        "budget": config.budget,
        "samples": len(samples),
        "queries": queries_record(len(samples), before, after, sent),
        "evaluation": {
            "eps": eps,
            "steps": config.eval_steps,
            "test_images": len(test),
            "students": students,
        },
        "ratios": ratios,
        "seconds": {"query": query_seconds, "total": time.perf_counter() - started},
        "device": str(device),
        "versions": package_versions(),
    }
    (out / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record

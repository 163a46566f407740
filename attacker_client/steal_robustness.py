"""One robustness-stealing run over the network: ``stealrange attack rrm``.

1. Read the victim encoder's metadata (input shape, embedding width), the attacker's labelled pool
   (``--query-set``, default the Fashion-MNIST pool the quick victims never trained on).
2. Read the key's usage, ask the victim for the representations of ``budget`` pool images (one query
   each, binary tensors, cached; with ``-p augment=true -p views=V``, of ``V`` augmented views of
   ``budget // V`` images), read the usage again.
3. Train the Robust Representation Matching student (:mod:`attacker_client.attacks.rrm`); then, on
   the same images and labels, the PGD adversarial training reference and a plain student (no
   queries).
4. Score each on held-out test images of the victim's dataset: clean accuracy and PGD accuracy
   (L-inf, the reference's eps, 20 steps of eps / 4, random start), with training times; write
   ``out/students/<name>/`` checkpoints and ``out/result.json`` from the typed result
   (:class:`RobustnessRunResult`, which it returns).

The ``robustness`` family (:mod:`attacker_client.families`): :class:`RobustnessStealingConfig`,
:func:`steal_robustness`, :class:`RobustnessEvalSpec`, :class:`RobustnessRunResult`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import RenderableType
from rich.table import Table

from attacker_client.attacks import RobustRepresentationMatching, build_attack
from attacker_client.attacks.rrm import StudentRun
from attacker_client.runs import (
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
from common.adversarial import robust_accuracy
from common.checkpoints import card_for, save_checkpoint
from common.datasets import get_dataset
from common.devices import resolve_device, seed_everything
from common.metrics import accuracy
from common.training import predict

STUDENTS_DIR = "students"


class RobustnessEvalSpec(BaseModel):
    """How RRM students are scored: clean and PGD accuracy on held-out test images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    test_size: int = Field(1000, ge=10)
    eval_steps: int = Field(20, ge=1, description="PGD steps of the evaluation")
    references: bool = Field(True, description="also train the PGD-AT and plain references")


class RobustnessStealingConfig(StealingRunConfig):
    """Everything one RRM run needs."""

    attack: str = "rrm"
    evaluation: RobustnessEvalSpec = Field(default_factory=RobustnessEvalSpec)


class StudentScores(BaseModel):
    """A student's clean and PGD accuracy, and its training seconds."""

    clean_accuracy: float
    pgd_accuracy: float
    train_seconds: float


class RobustnessEvaluation(BaseModel):
    """The students (``rrm``, and with the references ``pgd_at`` and ``plain``) scored at PGD
    ``eps`` with ``steps`` steps on ``test_images`` held-out images."""

    eps: float
    steps: int
    test_images: int
    students: dict[str, StudentScores]


class RobustnessRatios(BaseModel):
    """The RRM student against the PGD-AT reference (when it was trained)."""

    pgd_accuracy_vs_pgd_at: float
    train_time_vs_pgd_at: float


class RobustnessRunResult(RunResult):
    """What an RRM run records (``result.json``) and what the report reads from it."""

    family: Literal["robustness"] = "robustness"
    evaluation: RobustnessEvaluation
    ratios: RobustnessRatios | None

    success_label = "PGD accuracy of the student"
    quality_label = "clean accuracy of the student"
    legend = (
        "for robustness stealing (RRM), the student's PGD and clean accuracy next to PGD adversarial "
        "training of the same student"
    )

    @property
    def student(self) -> StudentScores:
        """The RRM student's scores."""
        return self.evaluation.students["rrm"]

    @property
    def success(self) -> float | None:
        return self.student.pgd_accuracy

    @property
    def quality(self) -> float | None:
        return self.student.clean_accuracy

    @property
    def victim_quality(self) -> float | None:
        """The test accuracy the victim's card reports (the robust encoder's own classifier)."""
        metrics = self.victim.reported_metrics
        value = metrics["accuracy"] if "accuracy" in metrics else metrics.get("test_accuracy")
        return None if value is None else float(value)

    def cell_text(self, budget: str) -> str:
        text = f"{budget}: PGD {fmt(self.student.pgd_accuracy)}, clean {fmt(self.student.clean_accuracy)}"
        at = self.evaluation.students.get("pgd_at")
        if at is not None:
            time_ratio = None if self.ratios is None else self.ratios.train_time_vs_pgd_at
            text += f" (PGD-AT {fmt(at.pgd_accuracy)}, time x{fmt(time_ratio, 2)})"
        return text

    def summary(self) -> list[RenderableType]:
        table = Table("student", "clean accuracy", "PGD accuracy", "training seconds", title=self.attack)
        for name, scores in self.evaluation.students.items():
            table.add_row(
                name,
                f"{scores.clean_accuracy:.4f}",
                f"{scores.pgd_accuracy:.4f}",
                f"{scores.train_seconds:.1f}",
            )
        return [table, f"{self.queries_line()}; PGD eps {self.evaluation.eps}"]


def score(
    run: StudentRun, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int
) -> StudentScores:
    """Clean and PGD accuracy of a student, and its training seconds."""
    return StudentScores(
        clean_accuracy=accuracy(predict(run.model, images), labels),
        pgd_accuracy=robust_accuracy(
            run.model,
            images,
            labels,
            eps=eps,
            step_size=eps / 4,
            steps=steps,
            generator=torch.Generator().manual_seed(0),
        ),
        train_seconds=run.seconds,
    )


def steal_robustness(config: RobustnessStealingConfig) -> RobustnessRunResult:
    """Run RRM against the victim API and its references; returns (and writes) the result."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    attack = build_attack(config.attack, config.params, RobustRepresentationMatching)
    seed_everything(attack.params.seed)
    spec_eval = config.evaluation
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

    version = version_of(metadata)
    victim_path = find_victim_checkpoint(config.victim_checkpoint, config.victim_store, config.model, version)
    dataset = metadata.get("dataset") or config.query_set
    test = get_dataset(dataset, "test", root=config.data_root).adapt(channels, (height, width))
    test = test.subset(torch.arange(min(len(test), spec_eval.test_size)))
    eps = attack.params.at_eps
    runs = {"rrm": rrm}
    if spec_eval.references:
        dim = int(metadata["embedding_dim"])
        runs["pgd_at"] = attack.adversarial_reference(samples, dim, device, config.progress)
        runs["plain"] = attack.plain_reference(samples, dim, device, config.progress)
    students = {
        name: score(run, test.images, test.labels, eps, spec_eval.eval_steps) for name, run in runs.items()
    }
    for name, run in runs.items():
        card = card_for(
            run.model.cpu(),
            f"{name.replace('_', '-')}-student",
            attack.params.architecture,
            input=spec,
            classes=list(samples.classes),
            dataset=config.query_set,
            metrics=students[name].model_dump(),
            training={
                "attack": attack.name,
                "student": name,
                "params": attack.params.model_dump(mode="json"),
            },
        )
        save_checkpoint(run.model, card, out / STUDENTS_DIR / name)
    ratios: RobustnessRatios | None = None
    if "pgd_at" in students:
        at, student = students["pgd_at"], students["rrm"]
        ratios = RobustnessRatios(
            pgd_accuracy_vs_pgd_at=student.pgd_accuracy / max(at.pgd_accuracy, 1e-12),
            train_time_vs_pgd_at=student.train_seconds / max(at.train_seconds, 1e-12),
        )
    record = RobustnessRunResult(
        **run_fields(config, attack, version, spec, metadata, victim_path, len(pool), VictimInfo),
        samples=len(samples),
        queries=queries_record(len(samples) * attack.queries_per_sample(), before, after, sent),
        evaluation=RobustnessEvaluation(
            eps=eps, steps=spec_eval.eval_steps, test_images=len(test), students=students
        ),
        ratios=ratios,
        seconds=RunSeconds(query=query_seconds, total=time.perf_counter() - started),
        device=str(device),
        versions=package_versions(),
    )
    record.write(out)
    return record

"""One classifier-stealing run over the network: ``stealrange attack knockoff|ensemble``.

1. Read the victim's metadata through the API (input shape, classes, the outputs this key may ask
   for) and resolve the output mode (``auto``: probabilities, else top-k, else label).
2. Read the key's usage, query the transfer set through :meth:`VictimClient.predict` (binary
   tensors, chunked, retried, cached on disk in ``out/query_cache.sqlite``), read the usage again:
   the queries spent are the server's count.
3. Train the surrogate(s) (Knockoff: one; ensemble: a UQ method's members), logging the members'
   predictions on held-out monitor images; save ``out/surrogate/`` (the single network) and
   ``out/members/<i>/`` (each member), all safetensors + card.
4. Evaluate on held-out test images of the victim's dataset (:mod:`attacker_client.evaluate_classifier`)
   against the victim's white-box checkpoint when one is given or found in the attacker's copy of
   the model store (``victim_store``).
5. Write ``out/result.json`` from the typed result (:class:`ClassifierRunResult`, which it returns)
   and ``out/diversity.png``.

Re-running the same command asks for the same images, which the cache answers for free.

The ``classifier`` family (:mod:`attacker_client.families`): :class:`ClassifierStealingConfig`,
:func:`steal_classifier`, :class:`~attacker_client.evaluate_classifier.ClassifierEvalSpec`,
:class:`ClassifierRunResult`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from rich.console import RenderableType
from rich.table import Table

from attacker_client.attacks import ClassifierAttack, build_attack
from attacker_client.attacks.classifier import AnswerMode, ClassifierOracle, answers_to_targets
from attacker_client.evaluate_classifier import (
    ClassifierEvalSpec,
    ClassifierEvaluation,
    ClassifierScores,
    evaluate_classifier_stealing,
)
from attacker_client.runs import (
    SURROGATE_DIR,
    ReportRow,
    RunResult,
    RunSeconds,
    StealingRunConfig,
    VictimInfo,
    budget_text,
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
from attacker_client.uq.base import Monitor, member_probabilities
from common import distributed
from common.checkpoints import card_for, load_checkpoint, save_checkpoint
from common.datasets import get_dataset
from common.devices import resolve_device, seed_everything
from common.models import Classifier

MEMBERS_DIR = "members"
DIVERSITY_PLOT = "diversity.png"


class ClassifierStealingConfig(StealingRunConfig):
    """Everything one classifier-stealing run needs; the CLI and the range build it."""

    attack: str = "knockoff"
    evaluation: ClassifierEvalSpec = Field(default_factory=ClassifierEvalSpec)


class ClassifierVictimInfo(VictimInfo):
    """A classifier victim: also its number of classes."""

    classes: int


class ClassifierRunResult(RunResult):
    """What a classifier-stealing run records (``result.json``) and what the report reads from it:
    the stolen model is the members' combination (for one surrogate: the surrogate)."""

    family: Literal["classifier"] = "classifier"
    method: str | None
    method_summary: dict[str, Any]
    output: AnswerMode
    victim: ClassifierVictimInfo
    evaluation: ClassifierEvaluation
    monitor: list[dict[str, Any]]
    history: list[dict[str, Any]]
    checkpoint: str
    members: list[str]

    success_label = "agreement with the victim"
    quality_label = "test accuracy"
    legend = (
        "for a classifier victim, the surrogate's agreement with the victim (fidelity) and its test "
        "accuracy on held-out images (for an ensemble: the members' mean probability, and its single "
        "network's agreement)"
    )

    @property
    def success(self) -> float | None:
        return self.evaluation.combined.agreement

    @property
    def quality(self) -> float | None:
        return self.evaluation.combined.accuracy

    @property
    def victim_quality(self) -> float | None:
        victim = self.evaluation.victim
        return None if victim is None else victim.accuracy

    @property
    def is_ensemble(self) -> bool:
        return len(self.evaluation.members) > 1

    def cell_text(self, budget: str) -> str:
        text = f"{budget}: agr {fmt(self.success)}, acc {fmt(self.quality)}"
        if self.is_ensemble:
            text += f" (single {fmt(self.evaluation.single.agreement)})"
        return text

    @classmethod
    def report_notes(cls, rows: Sequence[ReportRow]) -> list[str]:
        """The victim's test accuracy, and the ensembles' table: single network vs combination and
        the members' diversity (Pape et al.)."""
        out: list[str] = []
        victim = [v for v in (row.result.victim_quality for row in rows) if v]
        if victim:
            out += ["", f"The victim's test accuracy: {max(victim):.3f}."]
        ensembles = [row for row in rows if row.result.is_ensemble]
        if not ensembles:
            return out
        out += [
            "",
            "Ensembles: agreement of the single network and of the members' mean, and the members' "
            "prediction variance and pairwise disagreement on held-out images.",
            "",
            "| attack | defense | budget | single | combined | gain | variance | disagreement |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in sorted(ensembles, key=lambda r: (r.attack, r.defense, r.budget)):
            result: ClassifierRunResult = row.result
            single, combined = result.evaluation.single.agreement, result.success
            gain = None if single is None or combined is None else combined - single
            diversity = result.evaluation.diversity
            out.append(
                f"| {row.attack} | {row.defense} | {budget_text(row.budget)} | {fmt(single)} | "
                f"{fmt(combined)} | {fmt(gain)} | {fmt(diversity.variance, 5)} | "
                f"{fmt(diversity.disagreement)} |"
            )
        return out

    def summary(self) -> list[RenderableType]:
        evaluation = self.evaluation
        title = self.attack + (f" ({self.method})" if self.method else "")
        table = Table("surrogate", "accuracy", "agreement", "KL(victim||s)", "L1", title=title)

        def row(label: str, scores: ClassifierScores) -> None:
            cells = (scores.accuracy, scores.agreement, scores.kl, scores.l1)
            table.add_row(label, *(fmt(v, 4) for v in cells))

        if evaluation.victim is not None:
            row("victim", evaluation.victim)
        row("single network", evaluation.single)
        if self.is_ensemble:
            for i, scores in enumerate(evaluation.members):
                row(f"member {i}", scores)
            row("combined (mean)", evaluation.combined)
        diversity = evaluation.diversity
        line = (
            f"{self.queries_line()}, output {self.output}; members' variance "
            f"{diversity.variance:.5f}, disagreement {diversity.disagreement:.4f}; "
            f"{self.seconds.total:.0f} s on {self.device}"
        )
        return [table, line]


def resolve_output(requested: str, allowed: list[str]) -> AnswerMode:
    """The output mode to ask for: ``requested`` if this key may, ``auto``: the richest it may."""
    available: list[AnswerMode] = []
    if "probabilities" in allowed:
        available.append("probabilities")
    if "top_k_probabilities" in allowed:
        available.append("top_k")
    if "label" in allowed:
        available.append("label")
    if not available:
        raise ValueError(f"this key may ask for none of probabilities, top_k, label (allowed: {allowed})")
    if requested == "auto":
        return available[0]
    if requested not in available:
        raise ValueError(f"this key may not ask for {requested!r}; it may ask for {', '.join(available)}")
    return requested


def plot_diversity(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Prediction variance across members and agreement with the victim over training iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    iterations = [r["iteration"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(iterations, [r["variance"] for r in rows], marker="o")
    left.set(xlabel="training iterations", ylabel="prediction variance across members", title="diversity")
    if "combined_agreement" in rows[0]:
        for m in range(len(rows[-1]["member_agreement"])):
            right.plot(
                iterations,
                [r["member_agreement"][m] if m < len(r["member_agreement"]) else np.nan for r in rows],
                color="0.7",
                lw=1,
                label="members" if m == 0 else None,
            )
        right.plot(iterations, [r["combined_agreement"] for r in rows], color="C3", lw=2, label="combined")
        right.set(xlabel="training iterations", ylabel="agreement with the victim", title="fidelity")
        right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def steal_classifier(config: ClassifierStealingConfig) -> ClassifierRunResult:
    """Run the classifier attack of ``config`` against the victim API; returns (and writes) the result."""
    if distributed.launched_by_torchrun():
        raise RuntimeError(
            "classifier stealing does not run under torchrun (every rank would pay the budget): run "
            "one process; deep-ensemble members spread over the visible GPUs by themselves"
        )
    started = time.perf_counter()
    device = resolve_device(config.device)
    attack = build_attack(config.attack, config.params, ClassifierAttack)
    seed_everything(attack.params.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    with open_victim_client(config, out) as client:
        metadata = client.model_metadata(config.model)
        spec = victim_input(metadata, config.model, "classifier")
        channels, height, width = spec.shape
        classes = len(metadata["classes"])
        version = version_of(metadata)
        mode = resolve_output(attack.params.output, metadata.get("allowed_outputs") or [])
        k = min(attack.params.top_k, classes)

        def ask(images: np.ndarray) -> np.ndarray:
            answer = client.predict(config.model, images, mode=mode, top_k=k)
            return answers_to_targets(answer, mode, classes, attack.params.top_k_fill)

        pool = query_pool(config.query_set, config.query_split, spec, config.data_root)
        victim: Classifier | None = None
        victim_path = find_victim_checkpoint(
            config.victim_checkpoint, config.victim_store, config.model, version
        )
        if victim_path is not None:
            loaded, _ = load_checkpoint(victim_path, device)
            victim = loaded if isinstance(loaded, Classifier) else None
        dataset = metadata.get("dataset") or config.query_set
        test = get_dataset(dataset, "test", root=config.data_root).adapt(channels, (height, width))
        test = test.subset(torch.arange(min(len(test), config.evaluation.test_size)))
        monitor_images = test.images[: config.evaluation.monitor_size]
        reference = (
            member_probabilities([victim], monitor_images, device)[0].argmax(dim=1)
            if victim is not None
            else None
        )
        monitor = Monitor(monitor_images, reference)

        before = client.usage()
        result = attack.steal(
            ClassifierOracle(ask, classes, mode), pool, config.budget, device, config.progress, monitor
        )
        after = client.usage()
        sent = client.images_sent

    evaluation = evaluate_classifier_stealing(
        result.members, result.single, test.images, test.labels, victim, device
    )
    name = f"{attack.name}-{config.model}"[:64]
    card_kwargs: dict[str, Any] = {
        "input": spec,
        "dataset": config.query_set,
        "classes": list(metadata["classes"]),
        "training": {"attack": attack.name, "params": attack.params.model_dump(mode="json")},
    }
    save_checkpoint(
        result.single,
        card_for(
            result.single,
            name,
            attack.params.architecture,
            metrics=evaluation.single.metrics(),
            **card_kwargs,
        ),
        out / SURROGATE_DIR,
    )
    shutil.rmtree(out / MEMBERS_DIR, ignore_errors=True)
    for i, (member, scores) in enumerate(zip(result.members, evaluation.members, strict=True)):
        card = card_for(
            member, f"{name[:56]}-m{i}", attack.params.architecture, metrics=scores.metrics(), **card_kwargs
        )
        save_checkpoint(member, card, out / MEMBERS_DIR / str(i))
    plot_diversity(
        result.monitor, out / DIVERSITY_PLOT, f"{attack.name} ({result.extra.get('method', 'single')})"
    )

    record = ClassifierRunResult(
        **run_fields(
            config,
            attack,
            version,
            spec,
            metadata,
            victim_path,
            len(pool),
            ClassifierVictimInfo,
            classes=classes,
        ),
        method=result.extra.get("method"),
        method_summary=result.extra.get("method_summary", {}),
        output=mode,
        samples=result.samples,
        queries=queries_record(result.queries, before, after, sent),
        evaluation=evaluation,
        monitor=result.monitor,
        history=result.history,
        seconds=RunSeconds(
            query=result.query_seconds, train=result.train_seconds, total=time.perf_counter() - started
        ),
        device=str(device),
        checkpoint=str(out / SURROGATE_DIR),
        members=[str(out / MEMBERS_DIR / str(i)) for i in range(len(result.members))],
        versions=package_versions(),
    )
    record.write(out)
    return record

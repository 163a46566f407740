"""A new attack family in one module: a toy family (and one toy attack of it) registered here, and a
tiny scenario run with it through the real range (victim process, keys, results.jsonl, report),
with no change to the range, the report, the scenario code or the attacker client.

The toy attack asks the victim encoder for the embeddings of ``budget`` pool images and reports
their mean norm; its evaluation spec has one field, ``scale``, set from the scenario file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.console import RenderableType

from attacker_client.attacks import ATTACKS, Attack, AttackParams, build_attack
from attacker_client.families import FAMILIES, AttackFamily
from attacker_client.runs import (
    QuerySetInfo,
    ReportRow,
    RunResult,
    RunSeconds,
    StealingRunConfig,
    VictimInfo,
    open_victim_client,
    package_versions,
    queries_record,
    query_pool,
    version_of,
    victim_input,
)
from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from experiments.report import PLOTS
from experiments.results import read_results
from experiments.runner import run_scenario
from experiments.scenario import load_scenario


class ToyParams(AttackParams):
    """At most this many images are asked (and the budget)."""

    max_images: int = Field(1000, ge=2)


class ToyAttack(Attack):
    """Ask the victim for embeddings; keep their mean norm."""

    name = "toy_mean"
    paper = "a test's toy attack"
    family = "toy"
    Params = ToyParams
    params: ToyParams


class ToyEvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: float = Field(1.0, gt=0)


class ToyConfig(StealingRunConfig):
    attack: str = "toy_mean"
    evaluation: ToyEvalSpec = Field(default_factory=ToyEvalSpec)


class ToyResult(RunResult):
    family: Literal["toy"] = "toy"
    mean_norm: float
    scale: float

    success_label = "mean embedding norm"
    quality_label = "scaled mean norm"
    legend = "for the toy family, the mean norm of the victim's embeddings"

    @property
    def success(self) -> float | None:
        return self.mean_norm

    @property
    def quality(self) -> float | None:
        return self.mean_norm * self.scale

    @property
    def victim_quality(self) -> float | None:
        return None

    def cell_text(self, budget: str) -> str:
        return f"{budget}: toy {self.mean_norm:.3f} x{self.scale:g}"

    @classmethod
    def report_notes(cls, rows: Sequence[ReportRow]) -> list[str]:
        return ["", f"Toy cells: {len(rows)}."]

    def summary(self) -> list[RenderableType]:
        return [self.queries_line()]


def steal_toy(config: ToyConfig) -> ToyResult:
    started = time.perf_counter()
    attack = build_attack(config.attack, config.params, ToyAttack)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with open_victim_client(config, out) as client:
        metadata = client.model_metadata(config.model)
        spec = victim_input(metadata, config.model, "encoder")
        pool = query_pool(config.query_set, config.query_split, spec, config.data_root)
        n = min(config.budget, attack.params.max_images, len(pool))
        before = client.usage()
        query_started = time.perf_counter()
        embeddings = client.embed(config.model, pool.images[:n].numpy())
        query_seconds = time.perf_counter() - query_started
        after, sent = client.usage(), client.images_sent
    result = ToyResult(
        attack=attack.name,
        paper=attack.paper,
        params=attack.params.model_dump(mode="json"),
        victim=VictimInfo(
            url=config.url,
            model=config.model,
            version=version_of(metadata),
            input=list(spec.shape),
            reported_metrics=metadata.get("metrics", {}),
            checkpoint=None,
        ),
        query_set=QuerySetInfo(name=config.query_set, split=config.query_split, pool_size=len(pool)),
        budget=config.budget,
        samples=n,
        queries=queries_record(n, before, after, sent),
        seconds=RunSeconds(query=query_seconds, total=time.perf_counter() - started),
        device="cpu",
        versions=package_versions(),
        mean_norm=float(np.linalg.norm(embeddings, axis=1).mean()),
        scale=config.evaluation.scale,
    )
    result.write(out)
    return result


TOY = AttackFamily(
    name="toy", kind="encoder", config=ToyConfig, evaluation=ToyEvalSpec, result=ToyResult, steal=steal_toy
)


@pytest.fixture
def toy_family() -> Iterator[AttackFamily[ToyConfig, ToyResult]]:
    """The toy family and its attack, registered for one test."""
    FAMILIES.register(TOY)
    ATTACKS.register(ToyAttack)
    try:
        yield TOY
    finally:
        ATTACKS.unregister(ToyAttack.name)
        FAMILIES.unregister(TOY.name)


def test_a_family_registered_in_one_module_runs_through_the_range(
    toy_family: AttackFamily[ToyConfig, ToyResult], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    encoder = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=16)
    spec = InputSpec(channels=1, height=28, width=28)
    save_checkpoint(encoder, card_for(encoder, "enc", "small_cnn", input=spec), tmp_path / "store" / "enc")
    scenario = {
        "name": "tiny-toy",
        "model_store": str(tmp_path / "store"),
        "victims": [{"model": "enc", "profile": None}],
        "defenses": [
            {"name": "none"},
            {"name": "noise", "pipeline": [{"name": "embedding_noise", "sigma": 0.5}]},
        ],
        "attacks": [{"attack": "toy-mean", "params": {"max_images": 100}}],
        "budgets": [12, 24],
        "query_set": "synthetic",
        "query_split": "train",
        "evaluation": {"toy": {"scale": 2.0}},
        "defense_cost": None,
        "device": "cpu",
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(scenario))
    loaded = load_scenario(path)
    assert [cell.attack.family.name for cell in loaded.cells()] == ["toy"] * 4
    run_dir = run_scenario(loaded, runs=tmp_path / "runs", progress=False)

    lines = read_results(run_dir)
    assert len(lines) == 4 and all(line.ok and line.family == "toy" for line in lines)
    for line in lines:
        assert isinstance(line.result, ToyResult) and line.result.scale == 2.0
        assert line.key is not None and line.result.queries.spent == line.key.used == line.budget
        assert line.result.mean_norm > 0
    assert (run_dir / "cells" / lines[0].cell / "result.json").is_file()
    report = (run_dir / "report.md").read_text()
    assert "for the toy family, the mean norm" in report and "| toy-mean | " in report
    assert "12: toy " in report and "Toy cells: 4." in report
    for plot in PLOTS:
        assert (run_dir / plot).stat().st_size > 5_000

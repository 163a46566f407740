"""``stealrange claims`` (issue 18): the verdict rule, the per-seed cache, and a ci-sized run whose
markdown and json have the expected structure and whose every verdict is the one recomputed from the
per-seed numbers by an independent transcription of the rule (:func:`expected_verdict`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from attacker_client.attacks.ensemble import EnsembleStealing
from attacker_client.attacks.knockoff import Knockoff
from experiments.claims import CLAIMS, Claim, ClaimParams, ClaimRow, Measurement, verdict_of
from experiments.claims.base import Size
from experiments.claims.runner import cache_path, natural_key, plan_jobs, run_claims
from experiments.claims.shared import (
    ci_classifier_recipe,
    probabilities_oracle,
    trained_classifier,
    victim_splits,
)
from stealrange.cli import app

IMPLEMENTED = [
    "ast_kd",
    "ast_kd_paper",
    "ast_kd_released",
    "rda_vs_cont_steal",
    "rda_vs_cont_steal_equal_samples",
    "rda_vs_stolen_encoder",
    "rda_vs_stolen_encoder_equal_samples",
    "rrm",
    "uq_ensembles",
    "sep_eps8",
    "sep_eps16",
    "sep_eps32",
]
SECTION_FIELDS = [
    "Paper",
    "Paper's figure",
    "Measured",
    "Treatment",
    "Reference",
    "Difference",
    "Verdict",
    "Diagnosis",
    "Per seed",
    "Reproduce",
]


def expected_verdict(treatment: list[float], reference: list[float], direction: str) -> str:
    """The rule of issue 18, written out again: paired differences, mean +/- t(0.975, n-1) s / sqrt(n)."""
    d = [t - r for t, r in zip(treatment, reference, strict=True)]
    n = len(d)
    if n < 2:
        return "inconclusive"
    mean = sum(d) / n
    s = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    low, high = mean - half, mean + half
    if low <= 0 <= high:
        return "inconclusive"
    paper_side = (high < 0) if direction == "lower" else (low > 0)
    return "reproduced in direction" if paper_side else "not reproduced"


# --------------------------------------------------------------------------- the rule on fixed numbers


@pytest.mark.parametrize(
    ("differences", "direction", "verdict"),
    [
        ([-0.10, -0.12, -0.11], "lower", "reproduced in direction"),
        ([-0.10, -0.12, -0.11], "higher", "not reproduced"),
        ([0.004, 0.006, 0.005], "higher", "reproduced in direction"),
        ([0.004, 0.006, 0.005], "lower", "not reproduced"),
        ([0.01, -0.02, 0.015], "lower", "inconclusive"),
        ([0.01, -0.02, 0.015], "higher", "inconclusive"),
        # mean 0.03 > 0 but 2 seeds far apart: t(0.975, 1) = 12.7 makes the interval contain 0
        ([0.01, 0.05], "higher", "inconclusive"),
        ([-0.30], "lower", "inconclusive"),  # one seed: no interval
        ([], "lower", "inconclusive"),
    ],
)
def test_verdict_rule_on_fixed_numbers(differences: list[float], direction: str, verdict: str) -> None:
    assert verdict_of(differences, direction) == verdict  # type: ignore[arg-type]
    assert expected_verdict(differences, [0.0] * len(differences), direction) == verdict


def test_verdict_uses_the_paired_differences_not_the_two_intervals() -> None:
    # The two arms' own intervals overlap widely (seed-to-seed spread), the paired difference is
    # consistently negative: paired, the claim is reproduced in direction.
    treatment = [0.70, 0.80, 0.90]
    reference = [0.72, 0.83, 0.915]
    diffs = [t - r for t, r in zip(treatment, reference, strict=True)]
    assert verdict_of(diffs, "lower") == "reproduced in direction"
    assert expected_verdict(treatment, reference, "lower") == "reproduced in direction"


# ------------------------------------------------------------------ cache and resume, on a fake claim


class FakeParams(ClaimParams):
    shift: float = -0.1


class FakeClaim(Claim):
    """Treatment = reference + shift + a little seed noise; counts its measurements."""

    name = "fake_claim_for_tests"
    paper = "nobody, 2026"
    figure = "treatment 10 points lower"
    metric = "a number"
    treatment = "treated"
    reference = "untreated"
    direction = "lower"
    Params = FakeParams
    ci: ClassVar[dict[str, Any]] = {"shift": -0.2}
    calls: ClassVar[list[tuple[int, str]]] = []

    def measure(self, seed: int, size: Size) -> Measurement:
        FakeClaim.calls.append((seed, size))
        p = self.settings(size)
        return self.measurement(seed, size, 0.5 + p.shift + 0.01 * seed, 0.5, 0.0, spread=0.01 * seed)

    def diagnose(self, row: ClaimRow) -> str:
        return f"shifted by {row.difference.mean if row.difference else float('nan'):+.3f}"


@pytest.fixture
def fake_claim() -> Iterator[type[FakeClaim]]:
    CLAIMS.register(FakeClaim)
    FakeClaim.calls.clear()
    yield FakeClaim
    CLAIMS.unregister(FakeClaim.name)


def test_a_rerun_reads_the_cache_and_measures_nothing(fake_claim: type[FakeClaim], tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"only": [fake_claim.name], "seeds": 3, "size": "ci", "cache": tmp_path / "c"}
    first = run_claims(out=tmp_path / "a.md", **kwargs, log=lambda _: None)
    assert fake_claim.calls == [(0, "ci"), (1, "ci"), (2, "ci")]
    assert cache_path(tmp_path / "c", "ci", fake_claim.name, 2).is_file()
    second = run_claims(out=tmp_path / "b.md", **kwargs, log=lambda _: None)
    assert len(fake_claim.calls) == 3  # nothing measured again
    assert second.rows[0].per_seed == first.rows[0].per_seed
    assert second.rows[0].verdict == first.rows[0].verdict == "reproduced in direction"
    assert second.rows[0].diagnosis == "shifted by -0.190"

    # one more seed: only it is measured; other settings: measured again; --fresh: all again
    run_claims(out=tmp_path / "c.md", **(kwargs | {"seeds": 4}), log=lambda _: None)
    assert fake_claim.calls[3:] == [(3, "ci")]
    fake_claim.ci = {"shift": -0.3}
    try:
        run_claims(out=tmp_path / "e.md", **kwargs, log=lambda _: None)
    finally:
        fake_claim.ci = {"shift": -0.2}
    assert fake_claim.calls[4:] == [(0, "ci"), (1, "ci"), (2, "ci")]
    run_claims(out=tmp_path / "f.md", **kwargs, fresh=True, log=lambda _: None)
    assert len(fake_claim.calls) == 10


def test_a_failing_measurement_is_reported_and_the_rest_is_kept(
    fake_claim: type[FakeClaim], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = FakeClaim.measure

    def flaky(self: FakeClaim, seed: int, size: Size) -> Measurement:
        if seed == 1:
            raise RuntimeError("out of memory")
        return original(self, seed, size)

    monkeypatch.setattr(FakeClaim, "measure", flaky)
    report = run_claims(
        only=[fake_claim.name], seeds=3, size="ci", out=tmp_path / "r.md", cache=tmp_path, log=lambda _: None
    )
    assert report.rows[0].seeds == [0, 2]
    assert report.errors == {fake_claim.name: ["seed 1: RuntimeError: out of memory"]}
    assert "**Failed**: seed 1: RuntimeError: out of memory" in (tmp_path / "r.md").read_text()


# --------------------------------------------------------------------------- the real claims at ci size


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    root = tmp_path_factory.mktemp("claims")
    out, cache = root / "docs" / "claims.md", root / "cache"
    result = CliRunner().invoke(
        app, ["claims", "--size", "ci", "--seeds", "2", "--out", str(out), "--cache", str(cache)]
    )
    assert result.exit_code == 0, result.output
    return out, cache, result


def test_ci_run_writes_markdown_and_json_of_the_expected_structure(ci_run: tuple[Path, Path, Any]) -> None:
    out, _, _ = ci_run
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["size"] == "ci" and report["seeds"] == [0, 1] and report["errors"] == {}
    assert [row["name"] for row in report["rows"]] == sorted(IMPLEMENTED, key=natural_key)
    assert natural_key("sep_eps8") < natural_key("sep_eps16")
    text = out.read_text()
    assert text.startswith("# The papers' claims, checked")
    for row in report["rows"]:
        assert [s["seed"] for s in row["per_seed"]] == [0, 1]
        for s in row["per_seed"]:
            assert 0.0 <= s["treatment"] <= 1.0 and 0.0 <= s["reference"] <= 1.0
        assert row["treatment"]["n"] == 2 and row["difference"]["half_width"] is not None
        assert row["command"] == (
            f"stealrange claims --only {row['name']} --seeds 2 --size ci --out runs/claims/{row['name']}.md"
        )
        section = text.split(f"\n## {row['name']}\n", 1)[1].split("\n## ", 1)[0]
        fields = re.findall(r"^- \*\*([^*]+)\*\*", section, flags=re.MULTILINE)
        assert [f for f in fields if f in SECTION_FIELDS] == SECTION_FIELDS
        assert f"`{row['command']}`" in section
        assert row["diagnosis"] and "failed" not in row["diagnosis"]
        assert f"- **Diagnosis**: {row['diagnosis']}" in section
    sep = {row["name"]: row for row in report["rows"]}["sep_eps16"]
    assert sep["params"]["eps"] == pytest.approx(16 / 255)
    assert {"noise_accuracy", "target_share", "protector_accuracy"} <= set(sep["per_seed"][0]["extra"])
    uq = {row["name"]: row for row in report["rows"]}["uq_ensembles"]
    assert {"variance", "disagreement", "variance_first"} <= set(uq["per_seed"][0]["extra"])
    rrm = {row["name"]: row for row in report["rows"]}["rrm"]
    views, queries = rrm["params"]["views"], rrm["params"]["queries"]
    for s in rrm["per_seed"]:  # the queries are the samples' views, within the budget
        assert s["extra"]["queries"] == s["extra"]["samples"] * views <= queries
        assert {"pgd_at_pgd_accuracy", "time_ratio", "teacher_pgd_accuracy"} <= set(s["extra"])
    rows = {row["name"]: row for row in report["rows"]}
    budget = rows["rda_vs_stolen_encoder"]["params"]["budget"]
    for s in rows["rda_vs_stolen_encoder_equal_samples"]["per_seed"]:  # RDA's samples, one query each
        assert s["extra"]["stolen_encoder_samples_samples"] == s["extra"]["rda_samples"] < budget
        assert s["extra"]["stolen_encoder_samples_queries"] == s["extra"]["rda_samples"]
    for s in rows["rda_vs_cont_steal"]["per_seed"]:  # equal queries
        assert s["extra"]["cont_steal_queries"] <= budget == s["extra"]["rda_queries"]
    for s in rows["rda_vs_cont_steal_equal_samples"]["per_seed"]:  # RDA's samples, fresh views per step
        assert s["extra"]["cont_steal_samples_samples"] == s["extra"]["rda_samples"]
        assert s["extra"]["cont_steal_samples_queries"] > s["extra"]["rda_samples"]
    # the RDA arm is one surrogate per seed, shared by its rows
    rda_numbers = {tuple(s["treatment"] for s in rows[n]["per_seed"]) for n in rows if n.startswith("rda_")}
    assert len(rda_numbers) == 1
    # the AST rows share the plain teacher's student; the default row has Nasty and Stingy beside it
    plain = {tuple(s["reference"] for s in rows[n]["per_seed"]) for n in rows if n.startswith("ast_")}
    assert len(plain) == 1
    assert {"nasty_student", "stingy_student"} <= set(rows["ast_kd"]["per_seed"][0]["extra"])
    assert rows["ast_kd_released"]["diagnosis"].startswith("EPD, shuffled pairing")


def test_every_verdict_in_the_file_is_recomputed_from_the_per_seed_numbers(
    ci_run: tuple[Path, Path, Any],
) -> None:
    out, _, _ = ci_run
    report = json.loads(out.with_suffix(".json").read_text())
    text = out.read_text()
    table = {
        cells[0]: cells[-1]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| claim")
        for cells in [[c.strip() for c in line.strip("|").split(" | ")]]
    }
    assert set(table) == {row["name"] for row in report["rows"]}
    for row in report["rows"]:
        expected = expected_verdict(
            [s["treatment"] for s in row["per_seed"]],
            [s["reference"] for s in row["per_seed"]],
            row["direction"],
        )
        section = text.split(f"\n## {row['name']}\n", 1)[1].split("\n## ", 1)[0]
        written = re.search(r"^- \*\*Verdict\*\*: (.+)$", section, flags=re.MULTILINE)
        assert written is not None
        assert row["verdict"] == table[row["name"]] == written.group(1) == expected, row["name"]


def test_a_ci_rerun_reads_the_cache_and_measures_nothing(
    ci_run: tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out, cache, _ = ci_run

    def boom(self: Claim, seed: int, size: Size) -> Measurement:
        raise AssertionError(f"{self.name} seed {seed} measured again")

    for _, cls in CLAIMS.items():
        monkeypatch.setattr(cls, "measure", boom)
    again = tmp_path / "again.md"
    result = CliRunner().invoke(
        app, ["claims", "--size", "ci", "--seeds", "2", "--out", str(again), "--cache", str(cache)]
    )
    assert result.exit_code == 0, result.output
    before = json.loads(out.with_suffix(".json").read_text())["rows"]
    after = json.loads(again.with_suffix(".json").read_text())["rows"]
    assert [(r["per_seed"], r["verdict"]) for r in after] == [(r["per_seed"], r["verdict"]) for r in before]


def test_plan_jobs_keeps_each_group_whole_and_balances_the_minutes() -> None:
    claims = [CLAIMS.get(name)() for name in IMPLEMENTED]
    plan = plan_jobs(claims, 3, 2)
    assert len(plan) == 2 and sorted(n for names in plan for n in names) == sorted(IMPLEMENTED)
    for claim in claims:  # a group's claims share victims or memory: one process
        together = next(names for names in plan if claim.name in names)
        assert all(c.name in together for c in claims if c.group_name() == claim.group_name())
    assert {c.group_name() for c in claims if c.name.startswith("ast_")} == {"classifier"}
    assert len({c.group_name() for c in claims if c.name.startswith("rda_")}) == 1

    def load(names: list[str]) -> float:  # victims are trained before the jobs: not in the balance
        return sum(3 * CLAIMS.get(n).full_minutes for n in names)

    heavier, lighter = sorted((load(names) for names in plan), reverse=True)
    biggest_group = max(
        load([c.name for c in claims if c.group_name() == g]) for g in {c.group_name() for c in claims}
    )
    assert heavier - lighter <= biggest_group  # the greedy split's bound
    (single,) = plan_jobs(claims, 3, 1)
    assert sorted(single) == sorted(IMPLEMENTED)
    assert len(plan_jobs(claims[:1], 3, 4)) == 1


def test_victims_are_trained_before_any_measurement_and_ast_variants_share_one_baseline(
    tmp_path: Path,
) -> None:
    """prepare_victims trains each victim once, up front; the AST variants start from the plain
    teacher itself (never a plain copy of their own) and share its adversarial set."""
    from defenses.training import ast as ast_module

    digests: list[str] = []
    original = ast_module._digest

    def spy(*args: Any) -> str:
        digests.append(original(*args))
        return digests[-1]

    lines: list[str] = []
    only = ["ast_kd", "ast_kd_paper", "ast_kd_released", "uq_ensembles"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ast_module, "_digest", spy)
        run_claims(
            only, seeds=1, size="ci", out=tmp_path / "c.md", cache=tmp_path / "cache", log=lines.append
        )
    trained = [line.split()[2] for line in lines if line.startswith("training victim")]
    first_measure = next(i for i, line in enumerate(lines) if "measuring" in line)
    assert all(i < first_measure for i, line in enumerate(lines) if line.startswith("training victim"))
    assert len(trained) == len(set(trained)) == 6  # plain, 3 AST variants, Nasty, Stingy: once each
    assert len(digests) == 3 and len(set(digests)) == 1
    store = tmp_path / "cache" / "ci" / "model_store"
    assert sorted(p.name for p in store.iterdir()) == sorted(trained)


def test_a_ci_run_in_two_processes_measures_every_claim(tmp_path: Path) -> None:
    """``--jobs 2``: the groups measured in two spawned processes give the same rows, every seed
    cached, every verdict recomputable from the per-seed numbers."""
    out, cache = tmp_path / "claims.md", tmp_path / "cache"
    only = ["ast_kd", "ast_kd_paper", "sep_eps16", "rrm"]
    args = ["claims", "--size", "ci", "--seeds", "2", "--jobs", "2", "--out", str(out), "--cache", str(cache)]
    result = CliRunner().invoke(app, [*args, *[a for name in only for a in ("--only", name)]])
    assert result.exit_code == 0, result.output
    assert "2 jobs of" in result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["errors"] == {} and [r["name"] for r in report["rows"]] == sorted(only, key=natural_key)
    for row in report["rows"]:
        assert [s["seed"] for s in row["per_seed"]] == [0, 1]
        assert all(cache_path(cache, "ci", row["name"], seed).is_file() for seed in (0, 1))
        expected = expected_verdict(
            [s["treatment"] for s in row["per_seed"]],
            [s["reference"] for s in row["per_seed"]],
            row["direction"],
        )
        assert row["verdict"] == expected


def test_unknown_claim_and_size_are_refused(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["claims", "--only", "nope", "--out", str(tmp_path / "x.md")])
    assert bad.exit_code == 2 and "unknown claim" in bad.output
    assert runner.invoke(app, ["claims", "--size", "huge"]).exit_code == 2


def test_uq_reference_is_the_knockoff_surrogate_of_the_same_seed(tmp_path: Path) -> None:
    """The UQ claim's reference is the deep ensemble's first member: the Knockoff surrogate of the
    same seed, bit for bit (so it is not trained twice)."""
    recipe = ci_classifier_recipe()
    victim = trained_classifier(recipe, tmp_path)
    pool = victim_splits(recipe).attacker_pool
    common = {"epochs": 10_000, "max_steps": 5, "batch_size": 32, "lr": 0.02, "lr_step": None, "seed": 3}
    oracle = probabilities_oracle(victim)
    device = torch.device("cpu")
    ensemble = EnsembleStealing({**common, "members": 2}).steal(oracle, pool, 100, device, False)
    knockoff = Knockoff(common).steal(oracle, pool, 100, device, False)
    for (name, a), (_, b) in zip(
        ensemble.single.state_dict().items(), knockoff.single.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

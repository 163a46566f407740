"""The report's statistics on synthetic results: intervals over seeds, separation verdicts, the
queries (and time) to recover a share of the victim's gain, the single-seed case, plots on a first
build. Lines are typed :class:`CellLine` s with :class:`EncoderRunResult` s built here (no range run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.axes
import pytest
import yaml
from scipy import stats

from attacker_client.steal_encoder import EncoderRunResult
from experiments.report import PLOTS, build_report
from experiments.results import CellLine, append_result, read_results
from experiments.statistics import (
    GAIN_RECOVERED,
    INVARIANT_SUCCESS,
    QUALITY,
    SUCCESS,
    GroupKey,
    Interval,
    Reach,
    aggregate,
    compare,
    duration_text,
    reach,
    recovery_curves,
    recovery_time,
    separated,
    t_interval,
)

VICTIM, BASELINE = 0.85, 0.70  # the victim's and the no-query alternative's linear probe
BUDGETS = (1000, 2000, 4000)
OFFSETS = (-0.006, -0.002, 0.002, 0.006)  # per seed, on the probe: they sum to 0, so means are exact
# The mean share of the victim's gain recovered at each budget, per (attack, defense).
GAIN = {
    ("rda", "none"): (0.3, 0.6, 0.95),
    ("rda", "noise"): (0.3, 0.6, 0.95),
    ("rda", "b4b"): (0.1, 0.2, 0.3),
    ("stolen-encoder", "none"): (0.2, 0.4, 0.6),
    ("stolen-encoder", "noise"): (0.2, 0.4, 0.6),
    ("stolen-encoder", "b4b"): (0.1, 0.15, 0.2),
}
CKA = {"none": 0.90, "noise": 0.89, "b4b": 0.50}
COSINE = {"none": 0.80, "noise": 0.78, "b4b": 0.05}  # B4B: "another space"


def scores(probe: float) -> dict[str, dict[str, float]]:
    return {"fashion_mnist": {"linear_probe": probe, "knn": probe}}


def encoder_result(
    attack: str, budget: int, probe: float, cka: float, cosine: float, victim: float = VICTIM
) -> dict[str, Any]:
    return {
        "family": "encoder",
        "attack": attack,
        "paper": "synthetic",
        "params": {},
        "victim": {
            "url": "http://127.0.0.1:1",
            "model": "enc",
            "version": "v",
            "input": [1, 28, 28],
            "reported_metrics": {},
            "checkpoint": None,
            "embedding_dim": 16,
        },
        "query_set": {"name": "synthetic", "split": "train", "pool_size": 10_000},
        "budget": budget,
        "samples": budget,
        "queries": {
            "planned": budget,
            "spent": budget,
            "sent": budget,
            "cache_hits": 0,
            "key_used": budget,
            "key_remaining": 0,
        },
        "seconds": {"query": 1.0, "total": 2.0},
        "device": "cpu",
        "versions": {},
        "evaluation": {
            "surrogate": scores(probe),
            "victim": scores(victim),
            "untrained": scores(0.6),
            "no_query": scores(BASELINE),
            "fidelity": {
                "cosine": cosine,
                "l2": 1.0,
                "l2_normalised": 0.5,
                "cka": cka,
                "linear_r2": cka - 0.1,
            },
            "seconds": 1.0,
        },
        "history": [],
        "extra": {},
        "world_size": 1,
        "checkpoint": "surrogate",
    }


def line(
    attack: str,
    defense: str,
    budget: int,
    seed: int,
    offsets: tuple[float, ...] = OFFSETS,
    victim: float = VICTIM,
) -> CellLine:
    gain = GAIN[(attack, defense)][BUDGETS.index(budget)]
    probe = BASELINE + gain * (VICTIM - BASELINE) + offsets[seed]
    cka = CKA[defense] + offsets[seed]
    return CellLine.model_validate(
        {
            "cell": f"enc--{defense}--{attack}--{budget}--s{seed}",
            "status": "ok",
            "scenario": "synthetic",
            "victim": "enc",
            "defense": defense,
            "attack": attack,
            "family": "encoder",
            "budget": budget,
            "seed": seed,
            "result": encoder_result(attack, budget, probe, cka, COSINE[defense] + offsets[seed], victim),
            "key": {"id": f"k{seed}", "used": budget, "budget": budget},
            "audit": {
                "events": 2,
                "images": budget,
                "seconds": 3.0 + seed,
                "series": [(0.0, 0), (3.0, budget)],
            },
            "wall_seconds": 1.0,
        }
    )


def matrix(seeds: int) -> list[CellLine]:
    return [
        line(attack, defense, budget, seed)
        for (attack, defense) in GAIN
        for budget in BUDGETS
        for seed in range(seeds)
    ]


def write_run(run_dir: Path, lines: list[CellLine], rate: float | None = 2.0) -> Path:
    run_dir.mkdir(parents=True)
    for cell in lines:
        append_result(run_dir, cell)
    (run_dir / "scenario.yaml").write_text(yaml.safe_dump({"name": "synthetic", "rate": rate}))
    costs = {
        "enc--noise": {"defense": "noise", "cosine": 0.9, "linear_probe": 0.85, "linear_probe_drop": 0.03},
        "enc--b4b": {"defense": "b4b", "cosine": 0.1, "linear_probe": 0.85, "linear_probe_drop": 0.2},
        "enc": {"defense": "none", "cosine": 1.0, "linear_probe": 0.85, "linear_probe_drop": 0.0},
    }
    (run_dir / "costs.json").write_text(json.dumps(costs))
    return run_dir


# Intervals and separation.


def test_t_interval_against_the_formula():
    interval = t_interval([1.0, 2.0, 3.0, 4.0])
    assert interval is not None and interval.n == 4 and interval.mean == 2.5
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)
    assert interval.half_width == pytest.approx(3.182446305284263 * sd / 2, rel=1e-9)
    assert interval.half_width == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2)
    assert interval.text() == "2.500 ± 2.054 (n 4)"
    one = t_interval([0.7, None])
    assert one == Interval(n=1, mean=0.7, half_width=None) and one.low is None
    assert one.text() == "0.700 (n 1)"
    assert t_interval([None]) is None and t_interval([]) is None


def test_separation_verdicts():
    low = Interval(n=3, mean=0.5, half_width=0.05)
    high = Interval(n=3, mean=0.7, half_width=0.1)
    wide = Interval(n=3, mean=0.62, half_width=0.1)
    single = Interval(n=1, mean=0.9, half_width=None)
    assert compare(high, low) == "higher" and compare(low, high) == "lower" and separated(low, high)
    assert compare(low, wide) == "overlap" and not separated(low, wide)
    assert compare(single, low) == "no_interval" and not separated(single, low)
    assert compare(None, low) == "no_interval"


def test_groups_over_seeds_and_the_invariant_success_is_cka():
    groups = aggregate(matrix(4))
    assert len(groups) == len(GAIN) * len(BUDGETS)
    group = groups[GroupKey("enc", "b4b", "rda", 4000)]
    assert group.seeds == [0, 1, 2, 3]
    result = group.results[0]
    assert isinstance(result, EncoderRunResult)
    assert result.invariant_success == result.evaluation.fidelity.cka  # type: ignore[union-attr]
    cka, cosine = group.interval(INVARIANT_SUCCESS), group.interval(SUCCESS)
    assert cka is not None and cka.mean == pytest.approx(0.50) and cka.n == 4
    assert cosine is not None and cosine.mean == pytest.approx(0.05)
    sd = math.sqrt(sum(o**2 for o in OFFSETS) / 3)
    assert cka.half_width == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2)
    gain = group.interval(GAIN_RECOVERED)
    assert gain is not None and gain.mean == pytest.approx(0.3)
    none = groups[GroupKey("enc", "none", "rda", 4000)]
    assert compare(group.interval(INVARIANT_SUCCESS), none.interval(INVARIANT_SUCCESS)) == "lower"
    noise = groups[GroupKey("enc", "noise", "rda", 4000)]
    assert compare(noise.interval(INVARIANT_SUCCESS), none.interval(INVARIANT_SUCCESS)) == "overlap"
    assert (
        compare(
            none.interval(QUALITY), groups[GroupKey("enc", "none", "stolen-encoder", 4000)].interval(QUALITY)
        )
        == "higher"
    )


# How fast.


def test_reach_interpolates_and_says_when_it_cannot():
    xs = [1000.0, 2000.0, 4000.0]
    half = reach(xs, [0.3, 0.6, 0.95], 0.5)
    assert half.bound == "exact" and half.queries == pytest.approx(1000 + 2000 / 3)
    assert reach(xs, [0.3, 0.6, 0.95], 0.9).queries == pytest.approx(2000 + 0.3 / 0.35 * 2000)
    assert reach(xs, [0.55, 0.6, 0.95], 0.5) == Reach(bound="at_most", queries=1000.0)
    assert reach(xs, [0.1, 0.2, 0.3], 0.5) == Reach(bound="not_reached", queries=4000.0)
    # Non-monotone: the first crossing counts.
    assert reach(xs, [0.1, 0.7, 0.4], 0.5).queries == pytest.approx(1000 + 0.4 / 0.6 * 1000)


def test_recovery_curves_mean_and_band():
    curves = {(c.attack, c.defense): c for c in recovery_curves(aggregate(matrix(4)))}
    assert set(curves) == set(GAIN)
    rda = curves[("rda", "none")]
    assert rda.budgets == list(BUDGETS) and rda.queries == [1000.0, 2000.0, 4000.0] and rda.min_seeds == 4
    half = rda.recovery(0.5)
    assert half.mean.bound == "exact" and half.mean.queries == pytest.approx(1000 + 2000 / 3)
    assert half.fastest is not None and half.slowest is not None
    assert half.fastest.queries < half.mean.queries < half.slowest.queries
    # The band's bounds are where mean +/- half-width reach the target.
    hw = [g.half_width for g in rda.gain]
    assert half.fastest.queries == pytest.approx(
        reach(rda.queries, [0.3 + hw[0], 0.6 + hw[1], 0.95 + hw[2]], 0.5).queries
    )
    assert half.slowest.queries == pytest.approx(
        reach(rda.queries, [0.3 - hw[0], 0.6 - hw[1], 0.95 - hw[2]], 0.5).queries
    )
    assert rda.recovery(0.9).mean.queries == pytest.approx(2000 + 0.3 / 0.35 * 2000)
    b4b = curves[("rda", "b4b")].recovery(0.5)
    assert b4b.mean.bound == "not_reached" and b4b.text().startswith("not reached (> 4k)")
    # Time at the key's rate: queries / rate.
    assert recovery_time(half, 2.0).startswith(duration_text(half.mean.queries / 2.0))
    assert duration_text((1000 + 2000 / 3) / 2.0) == "14 min"
    assert recovery_time(half, None) == "no rate limit"
    assert recovery_time(b4b, 0.01).startswith("not reached (> 4.6 days)")
    assert (
        duration_text(30) == "30 s"
        and duration_text(5400) == "1.5 h"
        and duration_text(3 * 86400) == "3.0 days"
    )


# The report.


def test_report_with_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    points: list[tuple[Any, Any]] = []
    errorbar = matplotlib.axes.Axes.errorbar

    def record(self: Any, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        points.append((x, y))
        return errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record)
    failed = CellLine.model_validate(
        {
            "cell": "enc--b4b--rda--4000--s9",
            "status": "failed",
            "scenario": "synthetic",
            "victim": "enc",
            "defense": "b4b",
            "attack": "rda",
            "family": "encoder",
            "budget": 4000,
            "seed": 9,
            "error": "refused",
            "error_code": "budget_exhausted",
        }
    )
    refused = failed.model_copy(
        update={
            "cell": "enc--none--prada-probe--1000--s0",
            "attack": "prada-probe",
            "defense": "none",
            "budget": 1000,
        }
    )
    run_dir = write_run(tmp_path / "run", [*matrix(4), failed, refused])
    assert len(read_results(run_dir)) == len(GAIN) * len(BUDGETS) * 4 + 2
    report = build_report(run_dir).read_text()

    # How fast comes first, after the title.
    sections = [text for text in report.splitlines() if text.startswith("## ")]
    assert sections[0] == "## How fast a model is stolen"
    assert "rate limit (2 images/s" in report
    rows = {
        tuple(c.strip() for c in r.split("|")[1:4]): r for r in report.splitlines() if r.startswith("| enc |")
    }
    rda_none = rows[("enc", "rda", "none")]
    assert "| 1.7k [" in rda_none and "14 min [" in rda_none and "| 3.7k [" in rda_none
    assert "95 % ± " in rda_none and rda_none.endswith("| 4 |")
    assert "not reached (> 4k)" in rows[("enc", "rda", "b4b")]

    # Verdicts only where intervals separate.
    cka_defenses = (
        "linear CKA to the victim: defenses that lower it relative to `none`: rda: b4b; stolen-encoder: b4b."
    )
    for budget in ("1k", "2k", "4k"):
        assert f"- {budget}, {cka_defenses}" in report
    ahead = "linear probe accuracy: attacks ahead of others: under none: rda > stolen-encoder; under noise: "
    assert f"- 4k, {ahead}rda > stolen-encoder." in report  # not under b4b: 0.745 vs 0.730 overlap
    assert "- 1k, linear probe accuracy: attacks ahead of others: none separated." in report
    assert "noise" not in report.split("defenses that lower it relative to `none`: ")[1].split("\n")[0]
    assert (
        "stealing gain over the no-query alternative above 0 (interval): under none: rda, stolen-encoder"
        in report
    )
    assert "nothing in this report is marked significant" not in report

    # Every table: mean ± half-width and n.
    assert "| attack | none | noise | b4b |" in report
    assert "**linear CKA to the victim**" in report and "**cosine fidelity to the victim**" in report
    assert "the victim scores 0.850" in report
    assert "4k: 0.500 ± " in report and "(n 4)" in report
    assert "4k: 0.745 ± 0.008 (n 4) + 1 failed" in report  # rda behind b4b; the failed seed is counted apart
    assert "| enc | b4b | rda | 4k | 4000 ± 0 (n 4) | 4.5 ± 2.1 (n 4) | - |" in report  # audit over seeds
    assert "- `enc--b4b--rda--4000--s9`: refused" in report
    assert "| prada-probe | 1k: **budget_exhausted** (n 1) | - | - |" in report  # an attack that only failed

    # Plots exist and are linked on the first build; the trade-off plots CKA, not cosine.
    for plot in PLOTS:
        assert (run_dir / plot).stat().st_size > 5_000
        assert f"![{plot}]({plot})" in report
    scalars = [(x, y) for x, y in points if isinstance(y, float)]
    assert (0.2, pytest.approx(0.5)) in scalars and (0.03, pytest.approx(0.89)) in scalars
    assert not any(y == pytest.approx(0.05) for _, y in scalars)


def test_single_seed_report_marks_nothing_significant(tmp_path: Path):
    run_dir = write_run(tmp_path / "run", matrix(1), rate=None)
    report = build_report(run_dir).read_text()
    assert report.splitlines()[2] == "## How fast a model is stolen"
    assert "nothing in this report is marked significant" in report
    assert "no intervals exist, so no attack or defense is marked better than another" in report
    assert (
        "defenses that lower it" not in report and " > " not in report.split("## Cost")[0].split("## enc")[1]
    )
    assert "± " not in report.split("## Cost")[0]
    assert "(n 1)" in report
    rows = [r for r in report.splitlines() if r.startswith("| enc | rda | none |")]
    assert len(rows) == 1 and "[" not in rows[0] and "no rate limit" in rows[0]
    for plot in PLOTS:
        assert f"![{plot}]({plot})" in report and (run_dir / plot).is_file()


def test_a_results_file_alone_has_no_rate(tmp_path: Path):
    run_dir = write_run(tmp_path / "run", matrix(2))
    (run_dir / "scenario.yaml").unlink()
    report = build_report(run_dir).read_text()
    assert "rate limit is unknown" in report and "rate unknown" in report


def test_a_victim_below_the_no_query_alternative_is_not_timed(tmp_path: Path):
    """No gain to steal (victim <= no-query alternative): ``gain_recovered`` is None, the row is
    named as not timed, and the tables show ``-`` for it."""
    lines = [line("rda", "none", budget, seed, victim=0.65) for budget in BUDGETS for seed in range(3)]
    assert all(cell.result.gain_recovered is None for cell in lines)
    assert recovery_curves(aggregate(lines)) == []
    report = build_report(write_run(tmp_path / "run", lines)).read_text()
    assert "No cell measured the share of the victim's gain recovered" in report
    mixed = [*lines, *(line("rda", "b4b", budget, seed) for budget in BUDGETS for seed in range(3))]
    report = build_report(write_run(tmp_path / "mixed", mixed)).read_text()
    assert "| enc | rda | b4b | not reached (> 4k)" in report
    assert "Not timed (no cell measured the gain recovered: the victim does not beat" in report
    assert report.split("Not timed")[1].split("\n")[0].endswith(": enc/rda/none.")


def test_report_rate_times_an_unlimited_range(tmp_path: Path) -> None:
    """Keys that ran unlimited in the range are timed at the scenario's planned ``report_rate``."""
    run_dir = write_run(tmp_path / "run", matrix(3), rate=None)
    (run_dir / "scenario.yaml").write_text(yaml.safe_dump({"name": "synthetic", "report_rate": 2.0}))
    report = build_report(run_dir).read_text()
    assert "planned per-key limit of 2 images/s" in report and "14 min [" in report
    (run_dir / "scenario.yaml").write_text(
        yaml.safe_dump({"name": "synthetic", "rate": 4.0, "report_rate": 2.0})
    )
    assert "rate limit (4 images/s" in build_report(run_dir).read_text()

"""The range end to end on a tiny scenario: victim process, cells, report, resume, failures, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from experiments.report import PLOTS
from experiments.results import RESULTS_FILE, ResultsFormatError, read_results
from experiments.runner import VICTIM_FILE, run_scenario
from experiments.scenario import ScenarioError, load_scenario
from stealrange.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("range_store")
    torch.manual_seed(0)
    enc = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
    spec = InputSpec(channels=1, height=28, width=28)
    save_checkpoint(enc, card_for(enc, "enc", "small_cnn", input=spec, dataset="synthetic"), store / "enc")
    clf = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
    card = card_for(
        clf, "clf", "small_cnn", input=spec, dataset="synthetic", classes=[str(i) for i in range(10)]
    )
    save_checkpoint(clf, card, store / "clf")
    return store


def tiny_scenario(store: Path, **overrides: Any) -> dict[str, Any]:
    scenario: dict[str, Any] = {
        "name": "tiny",
        "model_store": str(store),
        "victims": [{"model": "enc", "profile": None}],
        "defenses": [
            {"name": "none"},
            {"name": "noise", "pipeline": [{"name": "embedding_noise", "sigma": 0.5}]},
        ],
        "attacks": [
            {"attack": "stolen_encoder", "params": {"epochs": 1, "batch_size": 16, "max_steps": 2}},
            {
                "attack": "rda",
                "params": {"epochs": 1, "batch_size": 8, "max_steps": 2, "n_views": 4, "train_views": 2},
            },
        ],
        "budgets": [40, 80],
        "query_set": "synthetic",
        "query_split": "train",
        "evaluation": {
            "encoder": {
                "downstream": ["synthetic"],
                "probe_train_size": 100,
                "test_size": 50,
                "fidelity_size": 20,
                "probe_epochs": 2,
                "mlp_probe": False,
            }
        },
        "defense_cost": {"images": 50, "probe_train_size": 100, "dataset": "synthetic"},
        "device": "cpu",
    }
    scenario.update(overrides)
    return scenario


def write(path: Path, scenario: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(scenario))
    return path


def test_tiny_scenario_end_to_end_and_resume(tiny_store: Path, tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path / "tiny.yaml", tiny_scenario(tiny_store)))
    run_dir = run_scenario(scenario, runs=tmp_path / "runs", progress=False)
    lines = read_results(run_dir)
    assert len(lines) == 8 and all(line.ok and line.family == "encoder" for line in lines)
    for line in lines:
        result, key, audit = line.result, line.key, line.audit
        assert key is not None and audit is not None
        assert result.queries.spent == key.used <= line.budget
        assert audit.images == key.used  # the server's audit stream agrees
        assert result.evaluation.surrogate["synthetic"]["linear_probe"] >= 0 and result.success is not None
        assert result.versions["torch"] == torch.__version__ and line.seed == result.params["seed"] == 0
    assert not (run_dir / VICTIM_FILE).exists()  # the victim process is gone
    report = (run_dir / "report.md").read_text()
    assert "| attack | none | noise |" in report and "Cost to honest users" in report
    for plot in PLOTS:
        assert (run_dir / plot).stat().st_size > 5_000

    # Rerun: every cell finished, nothing runs, nothing changes.
    before = (run_dir / RESULTS_FILE).read_text()
    run_scenario(scenario, runs=tmp_path / "runs", progress=False)
    assert (run_dir / "results.jsonl").read_text() == before

    # An unfinished cell runs again and finds its paid queries in its cache: they cost nothing.
    kept = [line for line in before.splitlines() if '"enc__noise__rda__80__s0"' not in line]
    (run_dir / RESULTS_FILE).write_text("\n".join(kept) + "\n")
    run_scenario(scenario, runs=tmp_path / "runs", progress=False)
    rerun = {line.cell: line for line in read_results(run_dir)}["enc__noise__rda__80__s0"].result
    assert rerun.queries.spent == 0 and rerun.queries.cache_hits == rerun.queries.planned > 0

    # The report rebuilds from results.jsonl alone.
    (run_dir / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.md").read_text().startswith("# Range report: tiny")

    # A results.jsonl from before typed results (lines without "family") is refused with what to do.
    old = json.loads(before.splitlines()[0])
    del old["family"]
    (run_dir / RESULTS_FILE).write_text(json.dumps(old) + "\n")
    with pytest.raises(ResultsFormatError, match=r"before results were typed.*--fresh"):
        read_results(run_dir)
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2 and "--fresh" in result.output
    with pytest.raises(ResultsFormatError, match="--fresh"):
        run_scenario(scenario, runs=tmp_path / "runs", progress=False)


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tiny_store: Path, tmp_path: Path) -> None:
    scenario = tiny_scenario(
        tiny_store,
        defenses=[
            {
                "name": "prada",
                "detector": {"name": "prada", "min_distances": 3, "delta": 0.999, "action": "refuse"},
            },
            {"name": "none"},
        ],
        attacks=[{"attack": "rda", "params": {"epochs": 1, "max_steps": 1, "n_views": 4, "train_views": 2}}],
        budgets=[400],
        defense_cost=None,
    )
    run_dir = run_scenario(
        load_scenario(write(tmp_path / "s.yaml", scenario)), runs=tmp_path / "runs", progress=False
    )
    lines = {line.defense: line for line in read_results(run_dir)}
    refused = lines["prada"]
    assert refused.status == "failed" and refused.error_code == "extraction_suspected"
    assert refused.result is None and refused.family == "encoder"
    assert refused.flags["enc--prada"].flag == "extraction_suspected"
    assert refused.key is not None and 0 < (refused.key.used or 0) < 400  # served before the refusals
    assert lines["none"].ok  # the run went on
    assert "extraction_suspected" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"attacks": [{"attack": "nope"}]}, "attacks.0.attack"),
        ({"attacks": [{"attack": "rda", "params": {"epochz": 1}}]}, "attacks.0.params"),
        ({"defenses": [{"name": "x", "pipeline": [{"name": "label_only"}]}]}, "defenses.0 (x)"),
        ({"defenses": [{"name": "x", "pipeline": [{"name": "embedding_noise", "sigma": -1}]}]}, "sigma"),
        ({"budgets": []}, "budgets"),
        ({"budgets": [0]}, "budgets must be >= 1"),
        ({"query_set": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"evaluation": {"encoder": {"probe_epochs": 0}}}, "evaluation.encoder.probe_epochs"),
        ({"evaluation": {"encoder": {"downstream": ["imagenet"]}}}, "evaluation.encoder.downstream"),
        ({"evaluation": {"classifier": {"test_size": 1}}}, "evaluation.classifier.test_size"),
        ({"evaluation": {"toy": {}}}, "unknown attack family 'toy'"),
        # The layout from before the family registry fails with where the fields moved.
        ({"evaluation": {"probe_epochs": 2}}, "moved under evaluation.encoder"),
        ({"classifier_evaluation": {"test_size": 20}}, "classifier_evaluation moved under evaluation"),
        ({"robustness_evaluation": {"test_size": 20}}, "write `evaluation: {robustness: {...}}`"),
        ({"rate": -1}, "rate"),
        ({"attackz": []}, "attackz"),
        ({"name": "Bad Name"}, "name"),
        (
            {
                "victims": [{"model": "clf", "kind": "classifier", "defense": "astt"}],
                "defenses": [{"name": "none"}],
                "attacks": [{"attack": "knockoff"}],
            },
            "victims.0.defense: unknown teacher defense 'astt'",
        ),
        (
            {
                "victims": [{"model": "clf", "kind": "classifier", "defense": "ast"}],
                "defenses": [{"name": "none"}],
                "attacks": [{"attack": "knockoff"}],
            },
            "victims.0.model: the ast recipe makes 'fmnist-classifier-ast'",
        ),
    ],
)
def test_bad_scenarios_name_the_field(
    tiny_store: Path, tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    path = write(tmp_path / "bad.yaml", tiny_scenario(tiny_store, **change))
    with pytest.raises(ScenarioError, match=r"invalid scenario") as error:
        load_scenario(path)
    assert field in str(error.value)


def test_bad_scenario_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no scenario file"):
        load_scenario(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(tmp_path / "list.yaml")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "broken.yaml")])
    assert result.exit_code == 2 and "not valid YAML" in " ".join(result.output.split())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_leaves_no_victim_behind(tiny_store: Path, tmp_path: Path, signum: signal.Signals) -> None:
    scenario = tiny_scenario(tiny_store, budgets=[40, 80, 120, 160, 200, 240], defense_cost=None)
    path = write(tmp_path / "s.yaml", scenario)
    env = {**os.environ, "STEALRANGE_NO_PROGRESS": "1"}
    runner = subprocess.Popen(
        [sys.executable, "-m", "stealrange.cli", "run", str(path), "--runs", str(tmp_path / "runs")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # As a shell starts a background job: SIGINT ignored. The runner must still honour it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    pid_file = tmp_path / "runs" / "tiny" / VICTIM_FILE
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        assert runner.poll() is None, runner.stdout.read().decode() if runner.stdout else ""
        assert time.monotonic() < deadline, "the victim never started"
        time.sleep(0.05)
    victim = json.loads(pid_file.read_text())["pid"]
    time.sleep(1.0)  # a cell or two in flight
    runner.send_signal(signum)
    output = runner.communicate(timeout=60)[0].decode()
    assert runner.returncode == 130, output
    assert "interrupted" in output
    assert not pid_file.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(victim, 0)  # the victim's whole process group is gone


TINY_CLASSIFIER_ATTACK = {"epochs": 2, "batch_size": 16, "feature_dim": 16, "lr_step": None}


def test_classifier_scenario_end_to_end(tiny_store: Path, tmp_path: Path) -> None:
    """A classifier victim behind classifier defenses, stolen by Knockoff and an ensemble."""
    scenario = tiny_scenario(
        tiny_store,
        name="tiny-clf",
        victims=[{"model": "clf", "kind": "classifier", "profile": None}],
        defenses=[{"name": "none"}, {"name": "top-1", "pipeline": [{"name": "top_k", "k": 1}]}],
        attacks=[
            {"attack": "knockoff", "params": TINY_CLASSIFIER_ATTACK},
            {
                "attack": "ensemble",
                "name": "swag",
                "params": {**TINY_CLASSIFIER_ATTACK, "method": "swag", "members": 2},
            },
        ],
        budgets=[48],
        evaluation={"classifier": {"test_size": 60, "monitor_size": 20}},
        defense_cost={"images": 50, "dataset": "synthetic"},
    )
    run_dir = run_scenario(
        load_scenario(write(tmp_path / "clf.yaml", scenario)), runs=tmp_path / "runs", progress=False
    )
    lines = {line.cell: line for line in read_results(run_dir)}
    assert sorted(lines) == sorted(
        f"clf__{d}__{a}__48__s0" for d in ("none", "top-1") for a in ("knockoff", "swag")
    )
    for line in lines.values():
        assert line.ok and line.family == "classifier" and line.key is not None
        assert line.result.queries.spent == line.key.used == 48
        assert 0 <= line.result.success <= 1 and line.result.victim_quality >= 0
        assert line.result.evaluation.test_images == 60  # the scenario's classifier evaluation
    assert len(lines["clf__none__swag__48__s0"].result.evaluation.members) == 2
    report = (run_dir / "report.md").read_text()
    assert "| attack | none | top-1 |" in report and "agr " in report and "| single | combined |" in report
    costs = json.loads((run_dir / "costs.json").read_text())
    assert costs["clf--top-1"]["kind"] == "classifier" and costs["clf--top-1"]["accuracy_drop"] == 0
    for plot in PLOTS:
        assert (run_dir / plot).stat().st_size > 5_000


def test_robustness_stealing_in_the_range(tiny_store: Path, tmp_path: Path) -> None:
    """RRM against an encoder behind an embedding defense: students and references per cell."""
    scenario = tiny_scenario(
        tiny_store,
        name="tiny-rrm",
        attacks=[{"attack": "rrm", "params": {"epochs": 1, "batch_size": 16, "at_steps": 1}}],
        budgets=[40],
        evaluation={"robustness": {"test_size": 20, "eval_steps": 2}},
        defense_cost=None,
    )
    run_dir = run_scenario(
        load_scenario(write(tmp_path / "rrm.yaml", scenario)), runs=tmp_path / "runs", progress=False
    )
    lines = read_results(run_dir)
    assert len(lines) == 2 and all(line.ok and line.family == "robustness" for line in lines)
    for line in lines:
        result = line.result
        assert line.key is not None and result.queries.spent == line.key.used == 40
        assert set(result.evaluation.students) == {"rrm", "pgd_at", "plain"} and 0 <= result.success <= 1
        assert result.ratios is not None and result.ratios.train_time_vs_pgd_at > 0
        assert result.evaluation.test_images == 20 and result.evaluation.steps == 2
    report = (run_dir / "report.md").read_text()
    assert "40: PGD " in report and "PGD-AT " in report


def test_data_protection_in_the_range(tmp_path: Path) -> None:
    """A scenario of Self-Ensemble Protection cells only: protected, evaluated, reported, resumed."""
    scenario = {
        "name": "tiny-sep",
        "data_protection": {
            "dataset": "synthetic",
            "size": 64,
            "methods": ["sep", "sep-fa"],
            "eps": [8],
            "steps": 2,
            "checkpoints": 2,
            "epochs": 1,
        },
        "device": "cpu",
    }
    loaded = load_scenario(write(tmp_path / "sep.yaml", scenario))
    assert loaded.cells() == []
    run_dir = run_scenario(loaded, runs=tmp_path / "runs", progress=False)
    report = (run_dir / "report.md").read_text()
    assert "## Data protection (Self-Ensemble Protection)" in report
    assert "| sep | 8/255 | 64 |" in report and "| sep-fa | 8/255 | 64 |" in report
    assert (run_dir / "protection.png").stat().st_size > 5_000
    done = run_dir / "protection" / "sep-eps8" / "evaluation.json"
    stamp = done.stat().st_mtime_ns
    run_scenario(loaded, runs=tmp_path / "runs", progress=False)
    assert done.stat().st_mtime_ns == stamp  # finished cells are not run again
    with pytest.raises(ScenarioError, match="needs victims, attacks and budgets, or data_protection"):
        load_scenario(write(tmp_path / "empty.yaml", {"name": "empty"}))


def test_each_victim_meets_the_attacks_of_its_kind(tiny_store: Path, tmp_path: Path) -> None:
    both = tiny_scenario(
        tiny_store,
        victims=[{"model": "enc", "profile": None}, {"model": "clf", "kind": "classifier", "profile": None}],
        defenses=[{"name": "none"}],
        attacks=[{"attack": "rda"}, {"attack": "knockoff"}],
        budgets=[100],
    )
    cells = load_scenario(write(tmp_path / "both.yaml", both)).cells()
    assert [c.id for c in cells] == ["enc__none__rda__100__s0", "clf__none__knockoff__100__s0"]
    lonely = {**both, "attacks": [{"attack": "rda"}]}
    with pytest.raises(ScenarioError, match="clf is a classifier and no attack steals one"):
        load_scenario(write(tmp_path / "lonely.yaml", lonely))


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments" / "scenarios").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_scenarios_are_valid(path: Path) -> None:
    scenario = load_scenario(path)
    assert (scenario.cells() or scenario.data_protection) and scenario.name == path.stem

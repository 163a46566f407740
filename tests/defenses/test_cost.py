"""``defenses cost`` and the ``name(param=value)`` syntax."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from defenses.cost import defense_cost, parse_defense
from stealrange.cli import app

SPEC = InputSpec(channels=1, height=28, width=28)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    clf = build_model("classifier", "small_cnn", 1, [0.5], [0.5])
    classes = [str(i) for i in range(10)]
    save_checkpoint(
        clf, card_for(clf, "clf", "small_cnn", input=SPEC, classes=classes, dataset="synthetic"), root / "clf"
    )
    enc = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
    save_checkpoint(enc, card_for(enc, "enc", "small_cnn", input=SPEC, dataset="synthetic"), root / "enc")
    return root


def test_parse_defense() -> None:
    assert parse_defense("reverse_sigmoid(beta=0.7, gamma=0.2)") == {
        "name": "reverse_sigmoid",
        "beta": 0.7,
        "gamma": 0.2,
    }
    assert parse_defense("label_only") == {"name": "label_only"}
    assert parse_defense("probability_noise(distribution=laplace, scale=1e-2)") == {
        "name": "probability_noise",
        "distribution": "laplace",
        "scale": 0.01,
    }
    for bad in ("top_k(3)", "9lives", "top_k(k=3"):
        with pytest.raises(ValueError):
            parse_defense(bad)


def test_classifier_cost(store: Path) -> None:
    free = defense_cost(store / "clf", [], n=200)
    assert free["agreement"] == 1.0 and free["l1"] == 0.0 and free["accuracy_drop"] == 0.0
    label = defense_cost(store / "clf", [{"name": "label_only"}], n=200)
    assert label["agreement"] == 1.0 and label["accuracy_drop"] == 0.0 and label["l1"] > 0 and label["kl"] > 0
    noisy = defense_cost(store / "clf", [{"name": "probability_noise", "scale": 1.0}], n=200)
    assert noisy["agreement"] < 1.0
    mad = defense_cost(store / "clf", [{"name": "mad", "epsilon": 0.2, "jacobian": "last_layer"}], n=64)
    assert 0 < mad["l1"] <= 0.2 + 1e-6


def test_encoder_cost(store: Path) -> None:
    free = defense_cost(store / "enc", [], n=200, probe_train_size=300)
    assert free["cosine"] == pytest.approx(1.0) and free["linear_probe_drop"] == 0.0
    noisy = defense_cost(
        store / "enc", [{"name": "embedding_noise", "sigma": 2.0}], n=200, probe_train_size=300
    )
    assert noisy["cosine"] < 0.9
    # B4B: the honest user's coverage grows over its queries (state in an embedded Redis); with no
    # noise the per-key affine map leaves a linear probe's accuracy unchanged.
    mapped = defense_cost(store / "enc", [{"name": "b4b", "alpha": 0.0}], n=200, probe_train_size=300)
    assert mapped["linear_probe"] == pytest.approx(mapped["defended_linear_probe"], abs=0.03)
    assert mapped["cosine"] < 0.9
    priced = defense_cost(
        store / "enc", [{"name": "b4b", "n_bits": 2, "alpha": 1.0}], n=200, probe_train_size=300
    )
    assert priced["defended_linear_probe"] < mapped["defended_linear_probe"]


def test_cli(store: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["defenses", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "reverse_sigmoid" in listed.output
    args = [
        "defenses",
        "cost",
        "--model",
        str(store / "clf"),
        "-d",
        "reverse_sigmoid(beta=0.7)",
        "-d",
        "top_k(k=3)",
    ]
    result = runner.invoke(app, [*args, "--images", "100", "--json"])
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.output)["defense"]
        == "reverse_sigmoid(beta=0.7, gamma=0.1) -> top_k(k=3, renormalise=True)"
    )
    bad = runner.invoke(app, ["defenses", "cost", "--model", str(store / "clf"), "-d", "embedding_noise"])
    assert bad.exit_code != 0 and "does not apply to classifier" in bad.output

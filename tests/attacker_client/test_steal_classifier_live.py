"""Classifier stealing over HTTP (live uvicorn + real Redis): label-only and top-k keys end to end, a
tiny ensemble that learns, queries charged once for all members, and a rerun through the CLI that
spends nothing."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from attacker_client.steal_classifier import ClassifierStealingConfig, steal_classifier
from common.checkpoints import InputSpec, card_for, load_checkpoint, save_checkpoint
from common.datasets import make_synthetic
from common.models import build_model
from common.training import TrainConfig, train_classifier
from stealrange.cli import app
from tests.conftest import create_key, run_live_server

TINY = {"epochs": 4, "batch_size": 32, "lr": 0.05, "feature_dim": 16, "lr_step": None}


def trained_classifier_store(root: Path) -> Path:
    """A model store with ``vic``: a small CNN trained for 2 epochs on synthetic images."""
    torch.manual_seed(1)
    model = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=64)
    train_classifier(
        model, make_synthetic(640, seed=3), TrainConfig(epochs=2, batch_size=32, device="cpu"), progress=False
    )
    spec = InputSpec(channels=1, height=28, width=28)
    card = card_for(
        model, "vic", "small_cnn", input=spec, dataset="synthetic", classes=[str(i) for i in range(10)]
    )
    save_checkpoint(model.eval(), card, root / "vic")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_classifier_store(tmp_path_factory.mktemp("classifier_store"))


def config(url: str, key: str, out: Path, store: Path, **overrides: object) -> ClassifierStealingConfig:
    fields: dict[str, object] = {
        "url": url,
        "key": key,
        "model": "vic",
        "attack": "knockoff",
        "params": TINY,
        "query_set": "synthetic",
        "query_split": "train",
        "budget": 300,
        "out": out,
        "device": "cpu",
        "victim_checkpoint": store / "vic",
        "evaluation": {"test_size": 300, "monitor_size": 100},
        "progress": False,
    }
    return ClassifierStealingConfig.model_validate({**fields, **overrides})


def key_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def test_label_only_and_top_k_keys_steal_end_to_end(redis_url: str, store: Path, tmp_path: Path) -> None:
    with run_live_server(store, redis_url) as url, httpx.Client(base_url=url) as admin:
        _, label_headers = create_key(admin, budget=400, models=["vic"], tier="label")
        label = steal_classifier(config(url, key_of(label_headers), tmp_path / "label", store))
        assert label.output == "label"  # auto: all a label-tier key may ask for
        assert label.queries.planned == label.queries.spent == 300
        assert label.evaluation.single.agreement > 0.5  # chance: 0.1

        # A label-tier key asking for probabilities is refused before a query is spent.
        with pytest.raises(ValueError, match="may not ask for 'probabilities'"):
            steal_classifier(
                config(
                    url,
                    key_of(label_headers),
                    tmp_path / "x",
                    store,
                    params={**TINY, "output": "probabilities"},
                )
            )
        assert admin.get("/v1/usage", headers=label_headers).json()["used"] == 300

        _, top_headers = create_key(admin, budget=400, models=["vic"])
        top = steal_classifier(
            config(
                url,
                key_of(top_headers),
                tmp_path / "top",
                store,
                params={**TINY, "output": "top_k", "top_k": 2},
            )
        )
        assert top.output == "top_k" and top.queries.spent == 300
        assert top.evaluation.single.agreement > 0.5
        _, card = load_checkpoint(tmp_path / "top" / "surrogate")
        assert card.kind == "classifier" and card.metrics["agreement"] == top.evaluation.single.agreement


def test_ensemble_over_http_learns_pays_once_and_reruns_for_free(
    redis_url: str, store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "swag"
    params = {**TINY, "method": "swag", "members": 3}
    with run_live_server(store, redis_url) as url, httpx.Client(base_url=url) as admin:
        _, headers = create_key(admin, budget=300, models=["vic"])
        record = steal_classifier(config(url, key_of(headers), out, store, attack="ensemble", params=params))
        assert record.method == "swag" and record.output == "probabilities"
        assert record.queries.spent == record.queries.planned == 300  # once for 3 members
        assert record.queries.key_remaining == 0
        evaluation = record.evaluation
        assert len(evaluation.members) == 3 and evaluation.combined.agreement > 0.5
        assert 0 <= evaluation.combined.l1 <= 2 and evaluation.combined.kl >= 0
        assert record.success == evaluation.combined.agreement and record.is_ensemble
        assert [row["epoch"] for row in record.monitor] == [1, 2, 3, 4]
        assert all(len(row["member_agreement"]) >= 1 for row in record.monitor)
        assert (out / "diversity.png").stat().st_size > 1000
        assert sorted(p.name for p in (out / "members").iterdir()) == ["0", "1", "2"]

        # The same command through the CLI: the cache answers, the exhausted key is not charged.
        args = ["attack", "ensemble", "--url", url, "--key", key_of(headers), "--model", "vic"]
        args += ["--budget", "300", "--out", str(out), "--method", "swag", "--members", "3"]
        args += [
            "--query-set",
            "synthetic",
            "--query-split",
            "train",
            "--device",
            "cpu",
            "--test-size",
            "300",
        ]
        args += ["--victim-checkpoint", str(store / "vic")]
        for name, value in TINY.items():
            args += ["-p", f"{name}={json.dumps(value)}"]
        result = CliRunner().invoke(app, args, env={"STEALRANGE_NO_PROGRESS": "1", "COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        again = json.loads((out / "result.json").read_text())
        assert again["queries"]["spent"] == 0 and again["queries"]["cache_hits"] == 300
        assert again["family"] == "classifier"
        assert again["evaluation"]["combined"] == evaluation.combined.model_dump()
        assert "combined (mean)" in result.output

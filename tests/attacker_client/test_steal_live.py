"""A tiny RDA run over HTTP (live uvicorn + real Redis): it learns, the server counts the queries,
and the same command run again through the CLI spends nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import torch
from typer.testing import CliRunner

from attacker_client.attacks import build_attack
from attacker_client.evaluate import EvalConfig
from attacker_client.steal_encoder import EncoderRunResult, EncoderStealingConfig, steal_encoder
from common.checkpoints import InputSpec, card_for, load_checkpoint, save_checkpoint
from common.datasets import make_synthetic
from common.metrics import extract_features, linear_probe
from common.models import build_model
from common.training import TrainConfig, train_classifier
from stealrange.cli import app
from tests.conftest import create_key, run_live_server

PARAMS = {"n_views": 4, "train_views": 2, "epochs": 5, "batch_size": 16, "lr": 3e-3}
EVAL = EvalConfig(
    downstream=["synthetic"],
    probe_train_size=300,
    test_size=200,
    probe_epochs=5,
    mlp_probe=False,
    fidelity_size=100,
)


def trained_encoder_store(root: Path) -> Path:
    """A model store with ``enc``: a small CNN encoder whose backbone is a classifier's trained for
    a few dozen steps on synthetic images (a random network is a degenerate victim: it embeds
    everything alike and its features are slow to imitate)."""
    torch.manual_seed(1)  # the initial weights, whatever ran before
    classifier = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=64)
    train_classifier(
        classifier,
        make_synthetic(640, seed=3),
        TrainConfig(epochs=2, batch_size=32, device="cpu"),
        progress=False,
    )
    encoder = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=64)
    encoder.backbone.load_state_dict(classifier.backbone.state_dict())
    spec = InputSpec(channels=1, height=28, width=28)
    save_checkpoint(encoder.eval(), card_for(encoder, "enc", "small_cnn", input=spec), root / "enc")
    return root


def test_rda_over_http_learns_and_reruns_for_free(redis_url: str, tmp_path: Path) -> None:
    model_store = trained_encoder_store(tmp_path / "store")
    out = tmp_path / "rda1"
    with run_live_server(model_store, redis_url) as url, httpx.Client(base_url=url) as admin:
        _, headers = create_key(admin, budget=256, models=["enc"])
        key = headers["Authorization"].removeprefix("Bearer ")
        config = EncoderStealingConfig(
            url=url,
            key=key,
            model="enc",
            attack="rda",
            params=PARAMS,
            query_set="synthetic",
            budget=200,
            out=out,
            device="cpu",
            victim_checkpoint=model_store / "enc",
            evaluation=EVAL,
            progress=False,
        )
        record = steal_encoder(config)
        assert isinstance(record, EncoderRunResult) and record.family == "encoder"
        assert record.samples == 50
        assert record.queries.planned == record.queries.spent == record.queries.sent == 200
        assert record.queries.key_used == 200 and record.queries.key_remaining == 56
        evaluation = record.evaluation
        assert set(evaluation.surrogate["synthetic"]) == {"linear_probe", "knn"}
        assert evaluation.victim is not None and evaluation.untrained is not None
        assert evaluation.fidelity and evaluation.untrained_fidelity
        assert evaluation.fidelity.cosine > evaluation.untrained_fidelity.cosine + 0.15
        assert record.success == evaluation.fidelity.cosine  # what the range's report reads
        written = EncoderRunResult.model_validate_json((out / "result.json").read_text())
        assert written == record  # result.json is the typed result

        # The surrogate checkpoint loads back and beats an untrained encoder on a probe of what the
        # victim knows: labels are the argmax of a fixed random projection of the victim's embedding.
        surrogate, card = load_checkpoint(out / "surrogate")
        assert card.kind == "encoder" and card.feature_dim == 64
        victim, _ = load_checkpoint(model_store / "enc")
        untrained = build_attack("rda", PARAMS).build_surrogate(make_synthetic(2), 64)
        images = make_synthetic(600, seed=11).images
        projection = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
        labels = (extract_features(victim.features_module(), images) @ projection).argmax(dim=1)

        def probe(model: torch.nn.Module) -> float:
            f = extract_features(model.features_module(), images)
            return linear_probe(f[:400], labels[:400], f[400:], labels[400:], 5, epochs=30)

        assert probe(surrogate) > probe(untrained) + 0.03

        # The same command through the CLI: every query is a cache hit, the server charges nothing.
        args = ["attack", "rda", "--url", url, "--key", key, "--model", "enc", "--budget", "200"]
        args += ["--out", str(out), "--query-set", "synthetic", "--device", "cpu", "--eval-sets", "synthetic"]
        args += ["--probe-train-size", "300", "--probe-epochs", "2", "--no-mlp-probe"]
        for name, value in PARAMS.items():
            args += ["-p", f"{name}={value}"]
        result = CliRunner().invoke(app, args, env={"STEALRANGE_NO_PROGRESS": "1", "COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        again = json.loads((out / "result.json").read_text())
        assert again["queries"]["spent"] == 0 and again["queries"]["cache_hits"] == 200
        assert again["queries"]["key_used"] == 200
        assert "queries spent (server): 0 of budget 200" in result.output


def test_torchrun_two_ranks_train_one_surrogate_and_spend_the_budget_once(
    redis_url: str, tmp_path: Path
) -> None:
    """``torchrun --nproc_per_node 2`` (gloo on the CPU): rank 0 alone queries, the other rank gets
    its answers, both train one surrogate by DDP, and the server charges the queries once."""
    model_store = trained_encoder_store(tmp_path / "store")
    out = tmp_path / "ddp"
    bin_dir = Path(sys.executable).parent
    with run_live_server(model_store, redis_url) as url, httpx.Client(base_url=url) as admin:
        _, headers = create_key(admin, budget=256, models=["enc"])
        key = headers["Authorization"].removeprefix("Bearer ")
        args = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"]
        args += [str(bin_dir / "stealrange"), "attack", "rda", "--url", url, "--key", key, "--model", "enc"]
        args += ["--budget", "200", "--out", str(out), "--query-set", "synthetic", "--device", "cpu"]
        args += ["--eval-sets", "synthetic", "--probe-train-size", "300", "--probe-epochs", "2"]
        args += ["--no-mlp-probe", "--victim-checkpoint", str(model_store / "enc")]
        # Twice the epochs of the single-process run: each rank takes half the batches.
        for name, value in {**PARAMS, "epochs": 2 * PARAMS["epochs"]}.items():
            args += ["-p", f"{name}={value}"]
        env = {**os.environ, "STEALRANGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        usage = admin.get("/v1/usage", headers=headers).json()

    record = json.loads((out / "result.json").read_text())
    assert record["world_size"] == 2
    assert record["queries"]["planned"] == record["queries"]["spent"] == record["queries"]["sent"] == 200
    assert record["queries"]["key_used"] == 200 == usage["used"]
    fidelity = record["evaluation"]["fidelity"]["cosine"]
    assert fidelity > record["evaluation"]["untrained_fidelity"]["cosine"] + 0.1
    assert done.stdout.count("queries spent (server): 200 of budget 200") == 1  # rank 0 reports

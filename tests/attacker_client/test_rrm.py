"""Robust Representation Matching: the loss against literal formulas, a tiny run in which the
student gains PGD accuracy over a plain student, and the run over HTTP (live uvicorn + real Redis)
charging one query per image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from attacker_client.attacks.rrm import RobustRepresentationMatching, rrm_loss
from common.adversarial import robust_accuracy, train_adversarial
from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.datasets import make_synthetic
from common.models import Classifier, build_model
from common.training import TrainConfig
from stealrange.cli import app
from tests.conftest import create_key, run_live_server

EPS = 0.06
# lam 0.1, not the released 0.005: in a few epochs the head learns too slowly at 0.005.
TINY = {
    "lam": 0.1,
    "epochs": 8,
    "batch_size": 32,
    "lr": 0.05,
    "at_eps": EPS,
    "at_step_size": EPS / 4,
    "at_steps": 3,
}


def test_rrm_loss_against_literal_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    logits, s, t = (torch.randn(4, k, generator=generator) for k in (3, 6, 6))
    y = torch.tensor([0, 2, 1, 1])
    ce = F.cross_entropy(logits, y)
    cosine = sum(float(s[i] @ t[i] / (s[i].norm() * t[i].norm())) for i in range(4)) / 4
    assert rrm_loss(logits, y, s, t, 0.3, 2.0).item() == pytest.approx(
        0.3 * ce.item() - 2.0 * cosine, rel=1e-5
    )
    l2 = sum(float((s[i] - t[i]).norm() / t[i].norm()) for i in range(4)) / 4
    assert rrm_loss(logits, y, s, t, 0.0, 1.0, "l2").item() == pytest.approx(l2, rel=1e-5)


@pytest.fixture(scope="module")
def robust_teacher() -> Classifier:
    torch.manual_seed(0)
    teacher = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
    assert isinstance(teacher, Classifier)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, device="cpu")
    train_adversarial(teacher, make_synthetic(480, seed=1), cfg, EPS, EPS / 4, 5, progress=False)
    return teacher.eval()


def test_rrm_student_gains_pgd_accuracy_over_a_plain_student(robust_teacher: Classifier) -> None:
    data, test = make_synthetic(480, seed=1), make_synthetic(200, seed=2)

    def oracle(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return robust_teacher.features(torch.from_numpy(images).float() / 255).numpy()

    attack = RobustRepresentationMatching(TINY)
    rrm, samples, _ = attack.steal(oracle, data, 480, torch.device("cpu"), False)
    plain = attack.plain_reference(samples, 32, torch.device("cpu"), False)
    assert rrm.model.backbone.__class__.__name__ == "SmallResNet"  # another architecture

    def robust(model: Classifier) -> float:
        return robust_accuracy(model, test.images, test.labels, eps=EPS, step_size=EPS / 4, steps=10)

    teacher_robust = robust(robust_teacher)
    assert teacher_robust > 0.8
    assert robust(rrm.model) > robust(plain.model) + 0.1  # measured: 0.46 vs 0.19 (seeds 1, 2: +0.23, +0.23)


def test_rrm_over_http_charges_one_query_per_image(
    robust_teacher: Classifier, redis_url: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    encoder = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
    encoder.backbone.load_state_dict(robust_teacher.backbone.state_dict())
    spec = InputSpec(channels=1, height=28, width=28)
    save_checkpoint(
        encoder.eval(),
        card_for(encoder, "renc", "small_cnn", input=spec, dataset="synthetic"),
        store / "renc",
    )
    out = tmp_path / "rrm"
    with run_live_server(store, redis_url) as url:
        import httpx

        with httpx.Client(base_url=url) as admin:
            _, headers = create_key(admin, budget=200, models=["renc"])
        key = headers["Authorization"].removeprefix("Bearer ")
        args = [
            "attack",
            "rrm",
            "--url",
            url,
            "--key",
            key,
            "--model",
            "renc",
            "--budget",
            "150",
            "--out",
            str(out),
        ]
        args += ["--query-set", "synthetic", "--query-split", "train", "--device", "cpu", "--test-size", "50"]
        args += ["--no-references", "-p", "epochs=1", "-p", "batch_size=32"]
        result = CliRunner().invoke(app, args, env={"STEALRANGE_NO_PROGRESS": "1", "COLUMNS": "200"})
        assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    assert record["queries"]["spent"] == record["queries"]["planned"] == 150
    assert (
        set(record["evaluation"]["students"]) == {"rrm"}
        and (out / "students" / "rrm" / "card.json").is_file()
    )
    assert "queries spent (server): 150 of budget 150" in result.output

"""Robust Representation Matching: the loss against literal formulas, the augmented views (crop +
flip against an exhaustive search, determinism under a seed), the query accounting with views, the
view schedule (epoch e on view e mod V), a tiny run in which the student gains PGD accuracy over a
plain student, and the run over HTTP (live uvicorn + real Redis) charging one query per image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from attacker_client.attacks.rrm import RobustRepresentationMatching, crop_flip, rrm_loss
from common.adversarial import robust_accuracy, train_adversarial
from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.datasets import make_synthetic
from common.models import Classifier, build_model
from common.training import TrainConfig, train_classifier
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


# ------------------------------------------------------------------------- augmented views, on fixed tensors

# A tiny, fast student for the schedule and accounting tests (a few optimizer steps each).
QUICK = {"epochs": 1, "batch_size": 4, "lr": 0.01, "seed": 5}


def test_crop_flip_is_a_padded_crop_then_a_flip_and_repeats_under_a_seed() -> None:
    # pixels 1..255: the zero padding shows where the window was cut
    images = torch.randint(
        1, 256, (64, 2, 7, 9), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    views = crop_flip(images, 2, torch.Generator().manual_seed(11))
    assert views.dtype == torch.uint8 and views.shape == images.shape
    found: list[tuple[int, int, bool]] = []
    for image, view in zip(images, views, strict=True):
        padded = torch.nn.functional.pad(image.float(), (2, 2, 2, 2))
        windows = {
            (top, left): padded[:, top : top + 7, left : left + 9] for top in range(5) for left in range(5)
        }
        matches = [
            (top, left, flipped)
            for (top, left), window in windows.items()
            for flipped in (False, True)
            if torch.equal(window.flip(-1) if flipped else window, view.float())
        ]
        assert len(matches) == 1, matches  # exactly one crop-and-flip of the padded image gives it
        found.append(matches[0])
    tops, lefts, flips = zip(*found, strict=True)
    assert set(tops) == set(lefts) == set(range(5))  # every offset of [0, 2 * padding] is drawn
    assert 16 <= sum(flips) <= 48  # about half are mirrored
    assert torch.equal(crop_flip(images, 2, torch.Generator().manual_seed(11)), views)  # seeded: again
    assert not torch.equal(crop_flip(images, 2, torch.Generator().manual_seed(12)), views)
    # no padding: each view is the image or its mirror image
    plain = crop_flip(images, 0, torch.Generator().manual_seed(3))
    assert all(torch.equal(v, x) or torch.equal(v, x.flip(-1)) for v, x in zip(plain, images, strict=True))
    with pytest.raises(ValueError, match="padding"):
        crop_flip(images, -1)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        crop_flip(images[0], 2)


def test_views_are_the_attacks_seeded_choice_and_need_augmentation() -> None:
    data = make_synthetic(12, seed=4)
    attack = RobustRepresentationMatching({**QUICK, "augment": True, "views": 3})
    views = attack.view_images(data)
    assert views.shape == (3, *data.images.shape) and views.dtype == torch.uint8
    assert torch.equal(
        views, RobustRepresentationMatching({**QUICK, "augment": True, "views": 3}).view_images(data)
    )
    assert not torch.equal(views[0], views[1])  # fresh augmentations, not copies
    other_seed = RobustRepresentationMatching({**QUICK, "seed": 6, "augment": True, "views": 3})
    assert not torch.equal(other_seed.view_images(data), views)
    assert torch.equal(RobustRepresentationMatching(QUICK).view_images(data), data.images.unsqueeze(0))
    with pytest.raises(ValueError, match="needs augment=true"):
        RobustRepresentationMatching({"views": 2})
    with pytest.raises(ValueError):
        RobustRepresentationMatching({"augment": True, "views": 0})


class CountingOracle:
    """A fixed random projection of the images, recording every batch it is asked about."""

    def __init__(self, dim: int = 8) -> None:
        self.weight = torch.randn(28 * 28, dim, generator=torch.Generator().manual_seed(1))
        self.asked: list[np.ndarray] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.asked.append(images.copy())
        return (torch.from_numpy(images).float().flatten(1) / 255 @ self.weight).numpy()

    @property
    def queries(self) -> int:
        return sum(len(a) for a in self.asked)


@pytest.mark.parametrize(
    ("budget", "views", "samples"),
    [(23, 4, 5), (24, 4, 6), (9, 1, 9), (40, 3, 13), (1000, 2, 30)],  # the last: the pool (30) limits
)
def test_queries_are_samples_times_views_and_never_above_the_budget(
    budget: int, views: int, samples: int
) -> None:
    pool = make_synthetic(30, seed=3)
    params = {**QUICK, "augment": views > 1, "views": views}
    attack = RobustRepresentationMatching(params)
    oracle = CountingOracle()
    run, chosen, _ = attack.steal(oracle, pool, budget, torch.device("cpu"), False)
    assert len(chosen) == samples and attack.queries_per_sample() == views
    assert oracle.queries == samples * views <= budget
    asked = torch.from_numpy(np.concatenate(oracle.asked))
    assert torch.equal(asked, attack.view_images(chosen).flatten(0, 1))  # exactly the views, once each
    assert run.history and run.history[0]["view"] == 0.0


def test_a_budget_below_two_samples_of_views_is_refused_before_any_query() -> None:
    oracle = CountingOracle()
    attack = RobustRepresentationMatching({**QUICK, "augment": True, "views": 4})
    with pytest.raises(ValueError, match="buys 1 samples at 4 queries each"):
        attack.steal(oracle, make_synthetic(30, seed=3), 7, torch.device("cpu"), False)
    assert oracle.queries == 0


def _parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_epoch_e_trains_on_view_e_mod_views() -> None:
    data = make_synthetic(16, seed=2)
    generator = torch.Generator().manual_seed(0)
    views = torch.stack([crop_flip(data.images, 2, generator) for _ in range(3)])
    teacher = torch.randn(3, 16, 8, generator=generator)
    device = torch.device("cpu")

    def attack(epochs: int) -> RobustRepresentationMatching:
        return RobustRepresentationMatching({**QUICK, "epochs": epochs, "batch_size": 8})

    run = attack(5).match(data, teacher, device, False, views)
    assert [row["view"] for row in run.history] == [0.0, 1.0, 2.0, 0.0, 1.0]
    # Poison view 2's teacher features: two epochs (views 0, 1) never read them, the third does.
    poisoned = teacher.clone()
    poisoned[2] = float("nan")
    assert torch.isfinite(_parameters(attack(2).match(data, poisoned, device, False, views).model)).all()
    assert not torch.isfinite(_parameters(attack(3).match(data, poisoned, device, False, views).model)).all()
    # Two identical views train exactly as the one view alone (same batches, same targets).
    twice = attack(3).match(data, teacher[:1].repeat(2, 1, 1), device, False, views[:1].repeat(2, 1, 1, 1, 1))
    once = attack(3).match(data, teacher[0], device, False, views[0].unsqueeze(0))
    assert torch.equal(_parameters(twice.model), _parameters(once.model))
    with pytest.raises(ValueError, match="do not fit"):
        attack(1).match(data, teacher[:2], device, False, views)


def test_the_references_train_on_the_same_views_on_the_same_schedule() -> None:
    data = make_synthetic(16, seed=2)
    params = {**QUICK, "epochs": 3, "batch_size": 8, "augment": True, "views": 2, "at_steps": 1}
    attack = RobustRepresentationMatching(params)
    device = torch.device("cpu")
    for run in (
        attack.plain_reference(data, 8, device, False),
        attack.adversarial_reference(data, 8, device, False),
    ):
        assert [row["view"] for row in run.history] == [0.0, 1.0, 0.0]
    # Clean (the default): the references are today's, bit for bit.
    clean = RobustRepresentationMatching({**QUICK, "epochs": 2, "batch_size": 8})
    plain = clean.plain_reference(data, 8, device, False)
    expected = clean.student(data, 8)
    train_classifier(expected, data, clean.params.train_config(device), progress=False)
    assert torch.equal(_parameters(plain.model), _parameters(expected))


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


@pytest.mark.parametrize(
    ("budget", "views", "samples"),
    [(150, 1, 150), (151, 3, 50)],  # 3 augmented views: 50 samples, 150 queries, 1 of the budget left
)
def test_rrm_over_http_charges_one_query_per_image(
    robust_teacher: Classifier, redis_url: str, tmp_path: Path, budget: int, views: int, samples: int
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
            str(budget),
            "--out",
            str(out),
        ]
        args += ["--query-set", "synthetic", "--query-split", "train", "--device", "cpu", "--test-size", "50"]
        args += ["--no-references", "-p", "epochs=1", "-p", "batch_size=32"]
        if views > 1:
            args += ["-p", "augment=true", "-p", f"views={views}"]
        result = CliRunner().invoke(app, args, env={"STEALRANGE_NO_PROGRESS": "1", "COLUMNS": "200"})
        assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    queries = record["queries"]
    assert queries["planned"] == samples * views == 150 and record["samples"] == samples
    # the server charges what was sent; the client's cache sends an image that two views happen to
    # crop alike (same offset and flip) once
    assert queries["spent"] == queries["sent"] == 150 - queries["cache_hits"]
    assert queries["cache_hits"] == 0 if views == 1 else 0 <= queries["cache_hits"] < 15
    assert (
        set(record["evaluation"]["students"]) == {"rrm"}
        and (out / "students" / "rrm" / "card.json").is_file()
    )
    assert f"queries spent (server): {queries['spent']} of budget {budget}" in result.output

"""Training-time defenses: the AST and Nasty Teacher losses against literal formulas (Nasty Teacher's
as ``train_nasty.py`` computes it), AST keeping a plain teacher's accuracy on a tiny run, and
defended victims from ``train_victim``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from common.checkpoints import load_checkpoint
from common.datasets import make_synthetic
from common.metrics import accuracy
from common.models import Classifier, build_model
from common.training import TrainConfig, predict, train_classifier
from defenses.training import TEACHER_DEFENSES
from defenses.training import ast as ast_module
from defenses.training.ast import adversarial_positions, adversarial_set, ast_loss, sparse_targets
from defenses.training.nasty import nasty_loss
from victims.recipes import VictimRecipe, recipe_for, train_victim


def test_registry_and_parameters() -> None:
    assert TEACHER_DEFENSES.names() == ["ast", "nasty", "stingy"]
    assert TEACHER_DEFENSES.build("ast").params.k == 2  # type: ignore[attr-defined]
    with pytest.raises(ValidationError):
        TEACHER_DEFENSES.build("ast", {"alpha": 2})
    with pytest.raises(ValueError, match="unknown teacher defense"):
        TEACHER_DEFENSES.build("kind")


def test_sparse_targets_keep_the_top_k_logits() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    q = sparse_targets(z, 2, 2.0)
    expected = torch.zeros(1, 4)
    expected[0, 1], expected[0, 2] = torch.softmax(torch.tensor([3.0, 2.0]) / 2, 0)
    assert torch.allclose(q, expected)


@pytest.mark.parametrize("divergence", ["kl", "epd"])
def test_ast_loss_against_a_literal_computation(divergence: str) -> None:
    generator = torch.Generator().manual_seed(0)
    logits, z_adv = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    labels = torch.tensor([0, 3, 4])
    alpha, t, k = 0.3, 4.0, 2
    total = 0.0
    for i in range(3):
        top = sorted(range(5), key=lambda c: -z_adv[i, c].item())[:k]
        q = [0.0] * 5
        norm = sum(torch.exp(z_adv[i, c] / t).item() for c in top)
        for c in top:
            q[c] = torch.exp(z_adv[i, c] / t).item() / norm
        p = torch.softmax(logits[i] / t, 0).tolist()
        if divergence == "kl":
            d = sum(
                q[c] * (torch.log(torch.tensor(q[c])) - torch.log(torch.tensor(p[c]))).item() for c in top
            )
        else:
            d = sum(torch.exp(torch.tensor(q[c])).item() * (q[c] - p[c]) for c in range(5))
        total += d / 3
    ce = F.cross_entropy(logits, labels).item()
    expected = alpha * t**2 * total + (1 - alpha) * ce
    assert ast_loss(logits, labels, z_adv, k, alpha, t, divergence).item() == pytest.approx(
        expected, rel=1e-5
    )


def released_nasty_loss(
    output_tch: torch.Tensor, output_stu: torch.Tensor, labels_batch: torch.Tensor, T: float, weight: float
) -> torch.Tensor:
    """``train_epoch_kd_adv`` of ``train_nasty.py`` (VITA-Group/Nasty-Teacher), transcribed:
    ``output_tch`` the teacher being trained, ``output_stu`` the frozen adversarial (baseline) net."""
    tch_loss = nn.CrossEntropyLoss()(output_tch, labels_batch)
    output_stu = output_stu.detach()
    adv_loss = nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(output_stu / T, dim=1), F.softmax(output_tch / T, dim=1)
    ) * (T * T)  # wish to max this item
    loss = tch_loss - weight * adv_loss + 100.0  # make the loss positive by adding a constant
    return loss


@pytest.mark.parametrize(("seed", "omega", "t"), [(0, 0.04, 4.0), (1, 0.04, 4.0), (2, 0.5, 2.0)])
def test_nasty_loss_is_the_released_train_nasty(seed: int, omega: float, t: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(16, 10, generator=generator) * 3).requires_grad_()
    baseline = torch.randn(16, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (16,), generator=generator)
    ours = nasty_loss(logits, labels, baseline, omega, t)  # default: KL(teacher || baseline)
    released = released_nasty_loss(logits, baseline, labels, t, omega)
    torch.testing.assert_close(ours + 100.0, released)  # the released constant changes no gradient
    (ours_grad,) = torch.autograd.grad(ours, logits)
    (released_grad,) = torch.autograd.grad(released, logits)
    torch.testing.assert_close(ours_grad, released_grad)
    assert TEACHER_DEFENSES.build("nasty").params.kl_direction == "teacher_baseline"  # type: ignore[attr-defined]


def test_nasty_loss_other_direction_against_a_literal_computation() -> None:
    generator = torch.Generator().manual_seed(1)
    logits, reference = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 1])
    p, q = torch.softmax(reference / 2, 1), torch.softmax(logits / 2, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()  # KL(baseline || teacher)
    expected = F.cross_entropy(logits, labels) - 0.5 * 4 * kl
    got = nasty_loss(logits, labels, reference, 0.5, 2.0, "baseline_teacher")
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(nasty_loss(logits, labels, reference, 0.5, 2.0), expected, atol=1e-3)
    with pytest.raises(ValueError, match="kl_direction"):
        nasty_loss(logits, labels, reference, 0.5, 2.0, "both")


def test_ast_teacher_keeps_near_plain_accuracy_on_a_tiny_run() -> None:
    data, test = make_synthetic(480, seed=1), make_synthetic(300, seed=2)
    cfg = TrainConfig(epochs=3, batch_size=32, device="cpu", lr=0.05)

    def fresh() -> Classifier:
        torch.manual_seed(0)
        model = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
        assert isinstance(model, Classifier)
        return model

    plain = fresh()
    train_classifier(plain, data, cfg, progress=False)
    defense = TEACHER_DEFENSES.build("ast", {"steps": 3, "step_size": 0.1})
    teacher = defense.train(plain, fresh(), data, cfg, progress=False)
    plain_accuracy = accuracy(predict(plain, test.images), test.labels)
    teacher_accuracy = accuracy(predict(teacher, test.images), test.labels)
    assert plain_accuracy > 0.8
    assert teacher_accuracy >= plain_accuracy - 0.05
    with torch.no_grad():  # its softened outputs are not the plain teacher's
        x = test.images[:64].float() / 255
        assert not torch.allclose(torch.softmax(teacher(x) / 6, 1), torch.softmax(plain(x) / 6, 1), atol=0.05)


def test_ast_takes_the_adversarial_logits_in_eval_mode() -> None:
    """As the released code: batch norm's running statistics see only the clean batches."""
    data = make_synthetic(64, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", max_steps=3)
    torch.manual_seed(0)
    baseline = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=8)
    fresh = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=8)
    assert isinstance(baseline, Classifier) and isinstance(fresh, Classifier)
    modes: list[bool] = []
    fresh.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    TEACHER_DEFENSES.build("ast", {"steps": 1, "step_size": 0.1}).train(
        baseline, fresh, data, cfg, progress=False
    )
    assert modes == [False, True] * 3  # per step: adversarial (eval), then clean (train)


def test_own_pairing_is_the_batch_itself() -> None:
    batch = torch.tensor([7, 2, 9])
    positions, cursor = adversarial_positions(batch, "own", 5, 10)
    assert positions.tolist() == [7, 2, 9] and cursor == 5


def test_shuffled_pairing_walks_the_adversarial_set_in_order_each_epoch() -> None:
    """The released zip(shuffled clean loader, unshuffled adversarial loader): batches of 4, 4 and 2
    of a 10-image epoch get positions 0-3, 4-7, 8-9, and the next epoch starts again at 0."""
    epoch = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    cursor, seen = 0, []
    for batch in (epoch[:4], epoch[4:8], epoch[8:], epoch[:4]):
        positions, cursor = adversarial_positions(batch, "shuffled", cursor, 10)
        seen.append(positions.tolist())
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="unknown pairing"):
        adversarial_positions(epoch, "random", 0, 10)


@pytest.mark.parametrize("pairing", ["own", "shuffled"])
def test_ast_pairing_chooses_the_adversarial_examples_of_each_step(pairing: str) -> None:
    """The adversarial batch the teacher is evaluated on: the clean batch's own examples, or the
    set's next ones in order (which differ from the shuffled clean batch's)."""
    data = make_synthetic(48, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", max_steps=3, seed=3)
    torch.manual_seed(0)
    baseline = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=8)
    fresh = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=8)
    assert isinstance(baseline, Classifier) and isinstance(fresh, Classifier)
    adversarial = adversarial_set(baseline, data, 0.3, 0.1, 1, torch.device("cpu"))
    inputs: list[torch.Tensor] = []
    fresh.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    TEACHER_DEFENSES.build("ast", {"steps": 1, "step_size": 0.1, "pairing": pairing}).train(
        baseline, fresh, data, cfg, progress=False
    )
    adversarial_inputs, clean_inputs = inputs[0::2], inputs[1::2]
    for step, (adv, clean) in enumerate(zip(adversarial_inputs, clean_inputs, strict=True)):
        if pairing == "shuffled":
            assert torch.equal(adv, adversarial[16 * step : 16 * (step + 1)])
        else:  # the clean images' own examples, whatever order the epoch drew
            rows = [int((data.images.float() / 255 == c).flatten(1).all(1).nonzero()) for c in clean]
            assert torch.equal(adv, adversarial[rows])


def test_adversarial_sets_are_made_once_per_baseline_and_settings() -> None:
    data = make_synthetic(32, seed=1)
    torch.manual_seed(0)
    baseline = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=8)
    assert isinstance(baseline, Classifier)
    ast_module._ADVERSARIAL_SETS.clear()
    first = adversarial_set(baseline, data, 0.3, 0.1, 1, torch.device("cpu"))
    assert adversarial_set(baseline, data, 0.3, 0.1, 1, torch.device("cpu")) is first
    other = adversarial_set(baseline, data, 0.3, 0.1, 2, torch.device("cpu"))
    assert other is not first and not torch.equal(other, first)
    with torch.no_grad():
        next(baseline.parameters()).add_(0.5)
    assert adversarial_set(baseline, data, 0.3, 0.1, 1, torch.device("cpu")) is not first
    assert len(ast_module._ADVERSARIAL_SETS) <= 2


def tiny_classifier() -> VictimRecipe:
    return VictimRecipe(
        name="tiny-classifier",
        kind="classifier",
        dataset="synthetic",
        train_size=64,
        train=TrainConfig(epochs=1, batch_size=16, max_steps=2, device="cpu"),
    )


@pytest.mark.parametrize("name", ["ast", "nasty", "stingy"])
def test_train_victim_with_a_teacher_defense(tmp_path: Path, name: str) -> None:
    plain = tiny_classifier()
    defended = plain.model_copy(
        update={
            "name": f"tiny-classifier-{name}",
            "defense": {
                "name": name,
                **TEACHER_DEFENSES.build(name, {"steps": 1} if name == "ast" else {}).params.model_dump(),
            },
        }
    )
    card = train_victim(defended, tmp_path, progress=False)
    assert (tmp_path / "tiny-classifier").is_dir()  # the baseline, trained first
    assert card.name == "tiny-classifier-ast" if name == "ast" else card.name.endswith(name)
    assert set(card.metrics) == {"test_accuracy", "baseline_test_accuracy"}
    assert card.training["recipe"]["defense"]["name"] == name
    model, _ = load_checkpoint(tmp_path / card.name)
    assert isinstance(model, Classifier)
    served = tmp_path / card.name / "defenses.json"
    if name == "stingy":
        assert json.loads(served.read_text())["default"] == [{"name": "top_k", "k": 2, "renormalise": True}]
    else:
        assert not served.exists()


def test_recipe_for_names_the_defended_victim() -> None:
    recipe = recipe_for("classifier", "quick", "ast")
    assert recipe.name == "fmnist-classifier-ast" and recipe.defense is not None
    assert recipe.defense["steps"] == 10 and recipe.defense["eps"] == 0.3
    assert recipe.baseline() == recipe_for("classifier", "quick")
    variant = recipe.model_copy(update={"name": f"{recipe.name}-epd-shuffled"})
    assert variant.baseline() == recipe_for("classifier", "quick")  # never a plain copy of its own
    with pytest.raises(ValueError, match="does not name its defense"):
        recipe.model_copy(update={"name": "renamed"}).baseline()
    assert recipe_for("classifier", "paper", "ast").defense["steps"] == 40  # type: ignore[index]
    with pytest.raises(ValueError, match="for classifiers"):
        recipe_for("encoder", "quick", "ast")

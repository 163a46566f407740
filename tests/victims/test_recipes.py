"""Victim recipes: training writes a servable checkpoint with metrics, and the same recipe is reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.checkpoints import load_checkpoint, read_card
from common.training import TrainConfig
from victims.recipes import (
    VictimRecipe,
    is_trained,
    paper_recipes,
    quick_recipes,
    recipe_for,
    train_victim,
)


def tiny(kind: str) -> VictimRecipe:
    return VictimRecipe(
        name=f"tiny-{kind}",
        kind=kind,  # type: ignore[arg-type]
        dataset="synthetic",
        train_size=64,
        probe_size=64,
        train=TrainConfig(epochs=1, batch_size=16, max_steps=2, device="cpu", optimizer="adam", lr=1e-3),
    )


@pytest.mark.parametrize("kind", ["classifier", "encoder"])
def test_train_victim_writes_card_and_reuses_it(tmp_path: Path, kind: str) -> None:
    recipe = tiny(kind)
    card = train_victim(recipe, tmp_path, progress=False)
    expected = {"classifier": {"test_accuracy"}, "encoder": {"linear_probe_accuracy", "knn_accuracy"}}[kind]
    assert set(card.metrics) == expected
    assert all(0.0 <= v <= 1.0 for v in card.metrics.values())
    assert card.training["recipe"] == recipe.model_dump(mode="json")
    _, loaded = load_checkpoint(tmp_path / recipe.name)
    assert loaded.sha256 == card.sha256 and loaded.input.shape == (1, 28, 28)
    assert is_trained(recipe, tmp_path)

    weights = tmp_path / recipe.name / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert train_victim(recipe, tmp_path, progress=False).sha256 == card.sha256
    assert weights.stat().st_mtime_ns == stamp, "the same recipe was retrained"

    changed = recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": 1})})
    assert not is_trained(changed, tmp_path)
    train_victim(changed, tmp_path, progress=False)
    assert read_card(tmp_path / recipe.name).training["recipe"]["train"]["seed"] == 1


def test_profiles_name_distinct_victims() -> None:
    quick, paper = quick_recipes(), paper_recipes()
    assert quick["classifier"].dataset == "fashion_mnist" and paper["encoder"].architecture == "resnet18"
    assert recipe_for("encoder", "paper").dataset == "cifar10"
    assert len({r.name for r in [*quick.values(), *paper.values()]}) == 4


def test_robust_recipe_serves_an_adversarially_trained_representation(tmp_path: Path) -> None:
    recipe = VictimRecipe.model_validate(
        {
            **tiny("encoder").model_dump(),
            "name": "tiny-robust",
            "adversarial": {"eps": 0.1, "step_size": 0.05, "steps": 1},
        }
    )
    card = train_victim(recipe, tmp_path, progress=False)
    assert card.kind == "encoder" and set(card.metrics) == {"test_accuracy", "pgd_accuracy"}
    assert card.metrics["pgd_accuracy"] <= card.metrics["test_accuracy"] + 0.05
    from victims.recipes import robust_recipe

    assert robust_recipe().adversarial.model_dump() == {"eps": 0.1, "step_size": 0.025, "steps": 5}  # type: ignore[union-attr]
    assert isinstance(robust_recipe().adversarial.steps, int)  # type: ignore[union-attr]
    assert robust_recipe("paper").architecture == "resnet18"


def test_supervised_encoder_serves_its_classifier_backbone(tmp_path: Path) -> None:
    """The quick encoder is a supervised backbone (worth stealing); the SimCLR one stays available."""
    quick = recipe_for("encoder", "quick")
    assert quick.objective == "supervised" and quick.name == "fmnist-encoder"
    simclr = recipe_for("encoder", "quick", objective="simclr")
    assert simclr.objective == "simclr" and simclr.name == "fmnist-simclr-encoder"
    assert recipe_for("encoder", "paper").objective == "simclr"
    assert recipe_for("encoder", "paper", objective="supervised").name == "cifar10-encoder-supervised"
    with pytest.raises(ValueError, match="encoder recipes"):
        recipe_for("classifier", "quick", objective="simclr")

    recipe = tiny("encoder").model_copy(update={"name": "tiny-supervised", "objective": "supervised"})
    card = train_victim(recipe, tmp_path, progress=False)
    assert set(card.metrics) == {"test_accuracy", "linear_probe_accuracy", "knn_accuracy"}
    _, loaded = load_checkpoint(tmp_path / recipe.name)
    assert loaded.kind == "encoder"

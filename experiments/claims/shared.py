"""What several claims share: the victims they steal (trained from :mod:`victims.recipes` or reused
from the model store), in-process oracles answering as the API would, and the data splits.

The ``full`` size uses the quick profile's victims (Fashion-MNIST, small CNN): the same recipes as
``stealrange train-victim``, so a store the range already filled is reused. The ``ci`` size uses
:data:`CI_DATASET` (``synthetic``: 2,000 training and 500 test images of 1x28x28) and a victim
trained for a few steps (:func:`ci_classifier_recipe`), stored in the ci store the runner hands
the claims, never in the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from attacker_client.attacks.classifier import ClassifierOracle
from common.checkpoints import load_checkpoint
from common.datasets import Splits, make_splits
from common.models import Classifier
from common.training import TrainConfig, predict
from defenses.base import DefensePipeline
from defenses.config import load_defense_config
from defenses.cost import defended
from victims.recipes import VictimRecipe, recipe_for, train_victim

CI_DATASET = "synthetic"


def ci_classifier_recipe() -> VictimRecipe:
    """A victim classifier on the synthetic set in about a second (12 SGD steps of 32 of its first
    256 private images)."""
    return VictimRecipe(
        name="ci-synthetic-classifier",
        kind="classifier",
        dataset=CI_DATASET,
        train_size=256,
        train=TrainConfig(epochs=2, batch_size=32, lr=0.05, max_steps=12),
    )


def classifier_recipe(dataset: str) -> VictimRecipe:
    """The victim classifier of ``dataset``: the quick profile's on Fashion-MNIST, the ci one on
    the synthetic set."""
    if dataset == CI_DATASET:
        return ci_classifier_recipe()
    recipe = recipe_for("classifier", "quick")
    if recipe.dataset != dataset:
        raise ValueError(
            f"no quick classifier recipe for {dataset!r} (the quick profile's is {recipe.dataset})"
        )
    return recipe


def trained_classifier(recipe: VictimRecipe, store: Path) -> Classifier:
    """The victim of ``recipe``, trained into ``store`` on first use and reused afterwards."""
    card = train_victim(recipe, store, progress=False)
    model, _ = load_checkpoint(Path(store) / card.name)
    if not isinstance(model, Classifier):
        raise TypeError(f"{card.name} is not a classifier")
    return model.eval()


def victim_splits(recipe: VictimRecipe) -> Splits:
    """The splits the victim was trained with: its private part, the attacker's pool (disjoint from
    it) and the test split."""
    return make_splits(recipe.dataset, seed=recipe.train.seed, victim_fraction=recipe.victim_fraction)


def probabilities_oracle(model: Classifier) -> ClassifierOracle:
    """The victim's probabilities, as the API serves them to a key with the ``probabilities`` mode."""

    def ask(images: np.ndarray) -> np.ndarray:
        return torch.softmax(predict(model, torch.from_numpy(images)), 1).numpy()

    return ClassifierOracle(ask, model.num_classes, "probabilities")


def served_oracle(
    folder: Path, mode: Literal["probabilities", "label"] = "probabilities"
) -> ClassifierOracle:
    """The checkpoint in ``folder`` answering as the API serves it: its probabilities through its
    own ``defenses.json`` pipeline (none, or Stingy's top-k), applied as the API applies it
    (:func:`defenses.cost.defended`); in ``label`` mode the argmax of that answer, one-hot."""
    model, _ = load_checkpoint(folder)
    if not isinstance(model, Classifier):
        raise TypeError(f"{folder} is not a classifier")
    pipeline = DefensePipeline.from_specs(load_defense_config(folder).default, "classifier")

    def ask(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images)
        probs = defended(pipeline, (torch.softmax(predict(model, x), 1), x))[0]
        if mode == "label":
            return torch.nn.functional.one_hot(probs.argmax(dim=1), model.num_classes).float().numpy()
        return probs.numpy()

    return ClassifierOracle(ask, model.num_classes, mode)

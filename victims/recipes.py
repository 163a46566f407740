"""Victim recipes and ``train-victim``: the quick profile (Fashion-MNIST, small CNN, 2-core CPU)
and the paper-scale profile (CIFAR-10, ResNet-18, GPU).

A trained victim is a checkpoint folder in the model store. Training is skipped when the folder
already holds a card made by the same recipe, so the range reuses its victims.

- classifier: supervised cross-entropy; the card records test accuracy on the held-out split.
- encoder, ``objective="simclr"``: SimCLR (Chen et al., ICML 2020; NT-Xent, temperature 0.5), the
  paper profile's encoder (RDA steals SimCLR encoders);
- encoder, ``objective="supervised"``: a classifier trained with cross-entropy whose backbone's
  representation is served as the encoder: the quick profile's encoder. At the quick scale a small
  SimCLR encoder is barely above random features (linear probe on Fashion-MNIST 0.77 vs 0.73 for an
  untrained CNN), which leaves an attacker nothing to steal; the supervised backbone scores ~0.89.
  The SimCLR one stays available (``fmnist-simclr-encoder``, scenario ``objective: simclr``).
  Either card records the linear-probe and kNN (k = 200, temperature 0.5) accuracy of the frozen
  features.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from common.adversarial import robust_accuracy, train_adversarial
from common.checkpoints import (
    CARD_FILE,
    InputSpec,
    ModelCard,
    card_for,
    load_checkpoint,
    read_card,
    save_checkpoint,
)
from common.datasets import ImageData, make_splits
from common.devices import resolve_device
from common.metrics import accuracy, extract_features, knn_accuracy, linear_probe
from common.models import Classifier, ModelKind, build_model
from common.training import TrainConfig, predict, train_classifier, train_simclr
from common.views import ViewConfig, ViewGenerator
from defenses.config import DefenseConfig, write_defense_config

Profile = Literal["quick", "paper"]


class AdversarialTraining(BaseModel):
    """PGD adversarial training (Madry et al. 2018): L-inf on [0, 1] inputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eps: float = Field(gt=0)
    step_size: float = Field(gt=0)
    steps: int = Field(ge=1)


class VictimRecipe(BaseModel):
    """Everything that determines a victim; its JSON is stored in the card to detect reuse."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: ModelKind
    dataset: str = "fashion_mnist"
    architecture: str = "small_cnn"
    feature_dim: int | None = None
    train_size: int | None = Field(None, ge=16, description="cap on victim-private training images")
    probe_size: int = Field(10_000, ge=16, description="training images of the encoder's probes")
    victim_fraction: float = Field(0.5, gt=0, lt=1)
    train: TrainConfig = TrainConfig()
    simclr_temperature: float = 0.5
    objective: Literal["simclr", "supervised"] = Field(
        "simclr",
        description="an encoder's training: SimCLR, or a supervised classifier whose backbone is served",
    )
    defense: dict[str, Any] | None = Field(
        None,
        description="a training-time defense of a classifier ({name, **params}, defenses/training/): "
        "the victim is trained from the plain recipe's baseline",
    )

    adversarial: AdversarialTraining | None = Field(
        None,
        description="PGD adversarial training ({eps, step_size, steps}, L-inf on [0, 1]); an encoder "
        "recipe with it trains a robust classifier and serves its backbone's representation",
    )

    def baseline(self) -> VictimRecipe:
        """The plain recipe a defended victim starts from: its name up to the defense's suffix
        (``fmnist-classifier-ast`` and a variant ``fmnist-classifier-ast-epd-shuffled`` both start
        from ``fmnist-classifier``), never a name of its own (which would train a second plain
        network and let the defended one overwrite it in the store)."""
        if self.defense is None:
            return self
        suffix = f"-{self.defense['name'].replace('_', '-')}"
        at = self.name.rfind(suffix)
        if at <= 0:
            raise ValueError(f"the defended recipe {self.name!r} does not name its defense ({suffix!r})")
        return self.model_copy(update={"defense": None, "name": self.name[:at]})


def quick_recipes() -> dict[ModelKind, VictimRecipe]:
    """Fashion-MNIST, small CNN: a few minutes on 2 CPU cores."""
    return {
        "classifier": VictimRecipe(
            name="fmnist-classifier",
            kind="classifier",
            train_size=20_000,
            train=TrainConfig(epochs=3, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4),
        ),
        "encoder": VictimRecipe(
            name="fmnist-encoder",
            kind="encoder",
            objective="supervised",
            train_size=20_000,
            train=TrainConfig(epochs=3, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4),
        ),
    }


def simclr_recipe(profile: Profile = "quick") -> VictimRecipe:
    """The SimCLR encoder of a profile (the paper profile's default encoder)."""
    if profile == "paper":
        return paper_recipes()["encoder"]
    return VictimRecipe(
        name="fmnist-simclr-encoder",
        kind="encoder",
        train_size=12_000,
        train=TrainConfig(epochs=4, batch_size=256, optimizer="adam", lr=2e-3, weight_decay=1e-6),
    )


def paper_recipes() -> dict[ModelKind, VictimRecipe]:
    """CIFAR-10, ResNet-18, as in the RDA / AST / SEP papers (a GPU machine)."""
    return {
        "classifier": VictimRecipe(
            name="cifar10-classifier",
            kind="classifier",
            dataset="cifar10",
            architecture="resnet18",
            victim_fraction=0.8,
            train=TrainConfig(epochs=160, batch_size=128, lr=0.1, schedule="multistep", milestones=[80, 120]),
        ),
        "encoder": VictimRecipe(
            name="cifar10-encoder",
            kind="encoder",
            dataset="cifar10",
            architecture="resnet18",
            victim_fraction=0.8,
            train=TrainConfig(epochs=500, batch_size=512, lr=0.06 * 512 / 256, weight_decay=5e-4),
        ),
    }


def robust_recipe(profile: Profile = "quick") -> VictimRecipe:
    """An adversarially trained (PGD-AT, Madry et al. 2018) classifier served as an encoder: the
    teacher whose robust representation Robust Representation Matching steals."""
    if profile == "quick":
        return VictimRecipe(
            name="fmnist-robust-encoder",
            kind="encoder",
            train_size=10_000,
            train=TrainConfig(epochs=3, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4),
            adversarial=AdversarialTraining(eps=0.1, step_size=0.025, steps=5),
        )
    return VictimRecipe(
        name="cifar10-robust-encoder",
        kind="encoder",
        dataset="cifar10",
        architecture="resnet18",
        victim_fraction=0.8,
        train=TrainConfig(epochs=100, batch_size=128, lr=0.1, schedule="multistep", milestones=[50, 75]),
        adversarial=AdversarialTraining(eps=8 / 255, step_size=2 / 255, steps=7),
    )


QUICK_TEACHER_DEFENSES: dict[str, dict[str, Any]] = {
    # 10 PGD steps of 0.03 instead of the paper's 40 of 0.01: same radius, a quarter of the compute.
    "ast": {"steps": 10, "step_size": 0.03},
}


def recipe_for(
    kind: ModelKind,
    profile: Profile = "quick",
    defense: str | None = None,
    objective: Literal["simclr", "supervised"] | None = None,
    **defense_params: Any,
) -> VictimRecipe:
    """The victim recipe of ``kind`` and ``profile``; with a training-time ``defense`` (classifiers:
    ``ast``, ``nasty``, ``stingy``), the defended recipe named ``<victim>-<defense>``; an encoder's
    ``objective`` picks the SimCLR or the supervised recipe (default: the profile's)."""
    recipe = (quick_recipes() if profile == "quick" else paper_recipes())[kind]
    if objective is not None and kind != "encoder":
        raise ValueError("an objective chooses between encoder recipes")
    if objective is not None and objective != recipe.objective:
        if objective == "simclr":
            recipe = simclr_recipe(profile)
        else:
            recipe = recipe.model_copy(update={"name": f"{recipe.name}-supervised", "objective": objective})
    if defense is None:
        return recipe
    if kind != "classifier":
        raise ValueError("training-time defenses are for classifiers")
    from defenses.training import TEACHER_DEFENSES

    name = defense.strip().lower().replace("-", "_")
    defaults = QUICK_TEACHER_DEFENSES.get(name, {}) if profile == "quick" else {}
    params = TEACHER_DEFENSES.build(name, {**defaults, **defense_params}).params.model_dump(mode="json")
    return recipe.model_copy(
        update={"name": f"{recipe.name}-{name.replace('_', '-')}", "defense": {"name": name, **params}}
    )


def _first(data: ImageData, n: int | None) -> ImageData:
    return data if n is None or n >= len(data) else data.subset(torch.arange(n))


def is_trained(recipe: VictimRecipe, store: Path) -> bool:
    """True when the store holds a checkpoint made by exactly this recipe."""
    folder = Path(store) / recipe.name
    if not (folder / CARD_FILE).is_file():
        return False
    try:
        return read_card(folder).training.get("recipe") == recipe.model_dump(mode="json")
    except ValueError:
        return False


def train_victim(
    recipe: VictimRecipe,
    store: str | Path,
    data_root: str | Path | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> ModelCard:
    """Train (or reuse) the victim of ``recipe`` and save it in ``store``; returns its card."""
    store = Path(store)
    if not force and is_trained(recipe, store):
        return read_card(store / recipe.name)
    device = resolve_device(recipe.train.device)
    splits = make_splits(
        recipe.dataset, root=data_root, seed=recipe.train.seed, victim_fraction=recipe.victim_fraction
    )
    train = _first(splits.victim_train, recipe.train_size)
    channels = train.channels
    # Normalisation statistics of the victim's own training data.
    pixels = _first(train, 20_000).to_float()
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).tolist()
    model = build_model(
        recipe.kind,
        recipe.architecture,
        channels,
        mean,
        std,
        num_classes=len(train.classes),
        feature_dim=recipe.feature_dim,
    )
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    served: list[dict[str, Any]] = []
    if recipe.defense is not None:
        from defenses.training import TEACHER_DEFENSES

        baseline_card = train_victim(recipe.baseline(), store, data_root=data_root, progress=progress)
        baseline, _ = load_checkpoint(store / baseline_card.name, device)
        assert isinstance(baseline, Classifier)
        spec = dict(recipe.defense)
        defense = TEACHER_DEFENSES.build(spec.pop("name"), spec)
        model = defense.train(baseline, model.to(device), train, recipe.train, progress)
        served = defense.served_pipeline()
        history: list[dict[str, float]] = []
        logits = predict(model, splits.eval.images, device=device)
        metrics["test_accuracy"] = accuracy(logits, splits.eval.labels)
        metrics["baseline_test_accuracy"] = baseline_card.metrics["test_accuracy"]
    elif recipe.adversarial is not None:
        classifier = build_model(
            "classifier", recipe.architecture, channels, mean, std, len(train.classes), recipe.feature_dim
        )
        pgd_settings = recipe.adversarial.model_dump()
        history = train_adversarial(classifier, train, recipe.train, **pgd_settings, progress=progress)
        metrics["test_accuracy"] = accuracy(
            predict(classifier, splits.eval.images, device=device), splits.eval.labels
        )
        held_out = _first(splits.eval, 1000)
        metrics["pgd_accuracy"] = robust_accuracy(
            classifier, held_out.images, held_out.labels, device=device, **pgd_settings
        )
        if recipe.kind == "encoder":  # serve the robust classifier's representation
            model.backbone.load_state_dict(classifier.backbone.state_dict())
        else:
            model = classifier
    elif recipe.kind == "classifier":
        history = train_classifier(model, train, recipe.train, progress=progress)
        logits = predict(model, splits.eval.images, device=device)
        metrics["test_accuracy"] = accuracy(logits, splits.eval.labels)
    else:
        if recipe.objective == "supervised":  # a classifier whose backbone's representation is served
            classifier = build_model(
                "classifier", recipe.architecture, channels, mean, std, len(train.classes), recipe.feature_dim
            )
            history = train_classifier(classifier, train, recipe.train, progress=progress)
            metrics["test_accuracy"] = accuracy(
                predict(classifier, splits.eval.images, device=device), splits.eval.labels
            )
            model.backbone.load_state_dict(classifier.backbone.state_dict())
            model.to(device)
        else:
            views = ViewGenerator(ViewConfig.simclr())
            history = train_simclr(
                model, train, recipe.train, views, recipe.simclr_temperature, progress=progress
            )
        probe_train = _first(splits.victim_train, recipe.probe_size)
        train_features = extract_features(model.features_module(), probe_train.images, device=device)
        test_features = extract_features(model.features_module(), splits.eval.images, device=device)
        classes = len(train.classes)
        metrics["linear_probe_accuracy"] = linear_probe(
            train_features, probe_train.labels, test_features, splits.eval.labels, classes
        )
        metrics["knn_accuracy"] = knn_accuracy(
            train_features, probe_train.labels, test_features, splits.eval.labels, classes
        )
    seconds = time.perf_counter() - started
    card = card_for(
        model.cpu(),
        recipe.name,
        recipe.architecture,
        input=InputSpec(channels=channels, height=train.height, width=train.width),
        classes=list(train.classes),
        dataset=recipe.dataset,
        description=f"{recipe.kind} victim trained on {len(train)} private {recipe.dataset} images"
        + (f", defended by {recipe.defense['name']}" if recipe.defense else ""),
        metrics=metrics,
        training={
            "recipe": recipe.model_dump(mode="json"),
            "seconds": round(seconds, 1),
            "final_loss": history[-1]["loss"] if history else None,
            "device": str(device),
            "torch": torch.__version__,
        },
    )
    saved = save_checkpoint(model, card, store / recipe.name)
    if served:
        write_defense_config(store / recipe.name, DefenseConfig(default=served))
    return saved

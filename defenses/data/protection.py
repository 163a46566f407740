"""The data owner's workflow around Self-Ensemble Protection (:mod:`defenses.data.sep`):

- :func:`protecting_checkpoints`: one training run of the protecting model, ``n_checkpoints``
  evenly spaced snapshots of it (the last is the final model);
- :func:`protect_dataset`: ``stealrange protect-data``: the protected copy of a dataset (or its
  random-noise baseline) written as ``images.safetensors`` (uint8 images, int64 labels; no pickle)
  and ``protection.json`` (method, eps, source, sizes, seconds);
- :func:`evaluate_protection`: ``stealrange evaluate-protection``: a fresh model trained on the
  protected copy, on the clean originals and on random noise of the same eps, each scored on the
  clean test split; protection works when the first is far below the other two.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from common.datasets import ImageData, get_dataset
from common.devices import resolve_device
from common.metrics import accuracy
from common.models import Classifier, build_model
from common.training import (
    TrainConfig,
    batch_to_device,
    batches_per_epoch,
    predict,
    run_steps,
    train_classifier,
)
from defenses.data.sep import SEPConfig, protect, random_noise

IMAGES_FILE = "images.safetensors"
META_FILE = "protection.json"


class ProtectionRecipe(BaseModel):
    """The data to protect and the protecting run (quick profile: Fashion-MNIST, small CNN)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "fashion_mnist"
    size: int | None = Field(None, ge=10, description="first images of the train split (null: all)")
    architecture: str = "small_cnn"
    n_checkpoints: int = Field(10, ge=1, description="evenly spaced snapshots of the run (paper: 30)")
    train: TrainConfig = TrainConfig(epochs=4, batch_size=128, lr=0.05)
    sep: SEPConfig = SEPConfig(eps=8 / 255, step_size=2 / 255, steps=10)
    data_root: Path | None = None


def fresh_classifier(data: ImageData, architecture: str, seed: int) -> Classifier:
    """An untrained classifier for ``data`` (normalised by the data's own statistics)."""
    pixels = data.to_float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(
            "classifier",
            architecture,
            data.channels,
            pixels.mean(dim=(0, 2, 3)).tolist(),
            pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist(),
            num_classes=len(data.classes),
        )
    assert isinstance(model, Classifier)
    return model


def protecting_checkpoints(
    data: ImageData, architecture: str, cfg: TrainConfig, n_checkpoints: int, progress: bool | None = None
) -> list[Classifier]:
    """``n_checkpoints`` snapshots of one supervised run on ``data``, evenly spaced in steps."""
    model = fresh_classifier(data, architecture, cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    labels = data.labels.to(device)
    total = cfg.epochs * batches_per_epoch(len(data), cfg.batch_size)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    marks = {max(1, round(total * (i + 1) / n_checkpoints)) for i in range(n_checkpoints)}
    snapshots: list[Classifier] = []

    def step(net: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = batch_to_device(data.images[batch], device)
        return torch.nn.functional.cross_entropy(net(x), labels[batch.to(device)])

    def on_step(done: int) -> None:
        if done in marks:
            snapshots.append(copy.deepcopy(model).eval())

    run_steps(model, len(data), step, cfg, description="protecting run", on_step=on_step, progress=progress)
    return snapshots


def save_protected(data: ImageData, folder: Path, meta: dict[str, Any]) -> Path:
    """Write ``images.safetensors`` + ``protection.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"images": data.images.contiguous(), "labels": data.labels.contiguous()}, str(folder / IMAGES_FILE)
    )
    (folder / META_FILE).write_text(json.dumps({**meta, "classes": list(data.classes)}, indent=2) + "\n")
    return folder


def load_protected(folder: str | Path) -> tuple[ImageData, dict[str, Any]]:
    """A protected copy written by :func:`save_protected` (checked as any :class:`ImageData`)."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    tensors = load_file(str(folder / IMAGES_FILE))
    data = ImageData(
        f"{meta['dataset']}-{meta['method']}", tensors["images"], tensors["labels"], meta["classes"]
    )
    return data, meta


def clean_subset(recipe: ProtectionRecipe) -> ImageData:
    """The clean images to protect: the first ``size`` of the dataset's train split."""
    data = get_dataset(recipe.dataset, "train", root=recipe.data_root)
    return data if recipe.size is None else data.subset(torch.arange(min(recipe.size, len(data))))


def protect_dataset(
    recipe: ProtectionRecipe, out: Path, method: str | None = None, progress: bool | None = None
) -> dict[str, Any]:
    """``stealrange protect-data``: write the protected copy (``method``: sep, sep-fa, sep-fa-vr, or
    noise for the random baseline; default the recipe's)."""
    started = time.perf_counter()
    data = clean_subset(recipe)
    method = method or recipe.sep.method
    device = resolve_device(recipe.train.device)
    meta: dict[str, Any] = {
        "dataset": recipe.dataset,
        "method": method,
        "eps": recipe.sep.eps,
        "images": len(data),
        "recipe": recipe.model_dump(mode="json"),
    }
    if method == "noise":
        protected = random_noise(data, recipe.sep.eps, recipe.sep.seed)
    else:
        config = recipe.sep.model_copy(update={"method": method})
        checkpoints = protecting_checkpoints(
            data, recipe.architecture, recipe.train, recipe.n_checkpoints, progress
        )
        meta["checkpoints"] = len(checkpoints)
        protected = protect(data, checkpoints, config, device, progress)
    delta = (protected.images.float() - data.images.float()).abs().amax().item() / 255
    meta |= {"max_perturbation": delta, "seconds": time.perf_counter() - started}
    save_protected(protected, out, meta)
    return meta


def train_and_test(train: ImageData, test: ImageData, architecture: str, cfg: TrainConfig) -> float:
    """Clean test accuracy of a fresh model trained on ``train``."""
    model = fresh_classifier(train, architecture, cfg.seed)
    train_classifier(model, train, cfg, progress=False)
    return accuracy(predict(model, test.images), test.labels)


def evaluate_protection(
    folder: str | Path, train: TrainConfig | None = None, test_size: int | None = None
) -> dict[str, Any]:
    """``stealrange evaluate-protection``: clean test accuracy after training on the protected copy,
    on the clean originals and on random noise of the same eps (same recipe, same seed)."""
    protected, meta = load_protected(folder)
    recipe = ProtectionRecipe.model_validate(meta["recipe"])
    cfg = train or recipe.train
    clean = clean_subset(recipe)
    if len(clean) != len(protected) or not torch.equal(clean.labels, protected.labels):
        raise ValueError(f"{folder} does not match the first {len(protected)} images of {recipe.dataset}")
    test = get_dataset(recipe.dataset, "test", root=recipe.data_root)
    if test_size is not None:
        test = test.subset(torch.arange(min(test_size, len(test))))
    noise = protected if meta["method"] == "noise" else random_noise(clean, meta["eps"], recipe.sep.seed)
    started = time.perf_counter()
    result = {
        "method": meta["method"],
        "eps": meta["eps"],
        "images": len(protected),
        "test_images": len(test),
        "protected": train_and_test(protected, test, recipe.architecture, cfg),
        "clean": train_and_test(clean, test, recipe.architecture, cfg),
        "random_noise": train_and_test(noise, test, recipe.architecture, cfg),
    }
    result["seconds"] = time.perf_counter() - started
    return result

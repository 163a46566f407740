"""Adaptive Misinformation (Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with
Adaptive Misinformation", CVPR 2020).

Stealing queries tend to be out of distribution (OOD) for the victim. Adaptive Misinformation
scores each query with the victim's maximum softmax probability ``S(x) = max_c y_c`` (the paper's
OOD detector, Hendrycks & Gimpel) and blends the true posterior ``y`` with the output of a
*misinformation function* ``y^`` trained to put little mass on the correct class:

    y' = (1 - alpha) y + alpha y^,      alpha = 1 / (1 + exp(nu (S(x) - tau)))

so in-distribution queries (``S > tau``) get (almost) the true answer and OOD queries get
misinformation. The misinformation model is a copy of the victim's architecture trained on the
victim's data with the paper's reverse cross-entropy ``-log(1 - y^_label)``
(:func:`train_misinformation_model`, or ``stealrange defenses train-misinformation``), saved as
the checkpoint folder ``misinformation/`` inside the victim's folder (so the API does not serve it
as a model of its own). Defaults: ``tau`` = 0.5, ``nu`` = 1000 (the paper's sharp switch).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from defenses.base import DEFENSES, DefenseContext, DefenseParams, OutputDefense

if TYPE_CHECKING:
    from common.checkpoints import ModelCard
    from common.models import ImageModel

MISINFORMATION_FOLDER = "misinformation"


class AdaptiveMisinformationParams(DefenseParams):
    tau: float = Field(0.5, ge=0, le=1, description="OOD threshold on the maximum softmax probability")
    nu: float = Field(1000.0, gt=0, description="sharpness of the switch between true and misinformation")
    misinformation: str = Field(
        MISINFORMATION_FOLDER,
        description="checkpoint folder of the misinformation model, in the victim's folder",
    )


def reverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The misinformation loss ``-log(1 - softmax(logits)_label)``, averaged (computed stably)."""
    log_p = torch.log_softmax(logits, dim=1)
    log_p_label = log_p.gather(1, labels[:, None])[:, 0]
    # log(1 - p) = log(-expm1(log p)), clamped away from log(0) when p -> 1.
    return -torch.log(-torch.expm1(log_p_label.clamp(max=-1e-7))).mean()


def misinformation_weight(s: torch.Tensor, tau: float, nu: float) -> torch.Tensor:
    """``alpha = 1 / (1 + exp(nu (s - tau)))`` (a sigmoid of ``nu (tau - s)``)."""
    return torch.sigmoid(nu * (tau - s))


@DEFENSES.register
class AdaptiveMisinformation(OutputDefense):
    """Blend in misinformation where the maximum softmax probability says out of distribution."""

    name = "adaptive_misinformation"
    paper = "Kariyappa & Qureshi, Adaptive Misinformation, CVPR 2020"
    kinds = frozenset({"classifier"})
    Params = AdaptiveMisinformationParams
    params: AdaptiveMisinformationParams
    needs_model = True
    misinformation_model: ImageModel | None = None  # set by bind()

    def bind(self, model: ImageModel, card: ModelCard, folder: Path | None) -> None:
        from common.checkpoints import load_checkpoint

        path = Path(folder or ".") / self.params.misinformation
        if not (path / "card.json").is_file():
            raise ValueError(
                f"adaptive_misinformation needs a misinformation model at {path}; train it with "
                f"`stealrange defenses train-misinformation --model {folder}`"
            )
        misinformation, mis_card = load_checkpoint(path, next(model.parameters()).device)
        if mis_card.num_classes != card.num_classes or mis_card.input != card.input:
            raise ValueError(f"misinformation model {path} does not match {card.name}'s inputs and classes")
        self.misinformation_model = misinformation.eval()

    @torch.inference_mode()
    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        if self.misinformation_model is None or context.inputs is None:
            raise RuntimeError("adaptive_misinformation needs bind() and the model inputs")
        device = next(self.misinformation_model.parameters()).device
        y_hat = torch.softmax(self.misinformation_model(context.inputs.to(device)).float(), dim=1)
        alpha = misinformation_weight(outputs.max(dim=1).values, self.params.tau, self.params.nu)
        return (1 - alpha[:, None]) * outputs + alpha[:, None] * y_hat.to(outputs.device, outputs.dtype)


def train_misinformation_model(
    victim_folder: str | Path,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    train_size: int | None = None,
    data_root: Path | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train the misinformation model of the classifier in ``victim_folder`` on the victim's own
    training split with :func:`reverse_cross_entropy`; save it in ``victim_folder/misinformation``.
    Returns its card's metrics (``test_accuracy``: how rarely it names the right class)."""
    from common.checkpoints import card_for, load_checkpoint, save_checkpoint
    from common.datasets import make_splits
    from common.metrics import accuracy
    from common.training import TrainConfig, batch_to_device, predict, resolve_device, run_steps

    folder = Path(victim_folder)
    victim, card = load_checkpoint(folder)
    if card.kind != "classifier":
        raise ValueError(f"{card.name} is an {card.kind}; adaptive misinformation defends classifiers")
    recipe = card.training.get("recipe", {})
    splits = make_splits(
        card.dataset,
        root=data_root,
        seed=recipe.get("train", {}).get("seed", 0),
        victim_fraction=recipe.get("victim_fraction", 0.5),
    )
    data = splits.victim_train
    if train_size is not None:
        data = data.subset(torch.arange(min(train_size, len(data))))
    data = data.adapt(card.input.channels, (card.input.height, card.input.width))
    model = reinitialised_copy(victim, seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, optimizer="adam")
    device = resolve_device(cfg.device)
    model.to(device)
    labels = data.labels.to(device)

    def step(net: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return reverse_cross_entropy(
            net(batch_to_device(data.images[batch], device)), labels[batch.to(device)]
        )

    started = time.perf_counter()
    history = run_steps(model, len(data), step, cfg, description="misinformation", progress=progress)
    test = splits.eval.adapt(card.input.channels, (card.input.height, card.input.width))
    metrics = {"test_accuracy": accuracy(predict(model, test.images, device=device), test.labels)}
    mis_card = card_for(
        model.cpu(),
        f"{card.name}-misinformation"[:64],
        card.architecture,
        input=card.input,
        classes=card.classes,
        dataset=card.dataset,
        description=f"misinformation model of {card.name} (reverse cross-entropy, Kariyappa & Qureshi 2020)",
        metrics=metrics,
        training={
            "epochs": epochs,
            "seconds": round(time.perf_counter() - started, 1),
            "final_loss": history[-1]["loss"] if history else None,
        },
    )
    save_checkpoint(model, mis_card, folder / MISINFORMATION_FOLDER)
    return metrics


def reinitialised_copy(model: ImageModel, seed: int) -> ImageModel:
    """A trainable copy of ``model``'s architecture (normalisation kept), re-initialised from ``seed``."""
    from defenses.output.mad import reinitialised

    copy = reinitialised(model, seed)
    for parameter in copy.parameters():
        parameter.requires_grad_(True)
    return copy  # type: ignore[return-value]

"""Checkpoints: safetensors weights plus a JSON model card.

A checkpoint is a folder ``<name>/`` holding ``model.safetensors`` and ``card.json``. The card
records everything needed to rebuild and serve the model (architecture, input shape,
normalisation, classes), what it was trained on, its measured metrics, which output modes each key
tier may use, and the sha256 of the weights file, checked on every load. Weights are never
unpickled: safetensors holds plain tensors only.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from common.models import ImageModel, ModelKind, build_model

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"

OutputMode = Literal["logits", "probabilities", "top_k", "label", "embedding"]
CLASSIFIER_MODES: tuple[OutputMode, ...] = ("logits", "probabilities", "top_k", "label")
ENCODER_MODES: tuple[OutputMode, ...] = ("embedding",)


class InputSpec(BaseModel):
    """The image a model takes: channels x height x width, uint8 on the wire, [0, 1] floats inside."""

    model_config = ConfigDict(frozen=True)
    channels: int = Field(ge=1, le=4)
    height: int = Field(ge=1, le=1024)
    width: int = Field(ge=1, le=1024)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def _default_tiers() -> dict[str, list[OutputMode]]:
    return {
        "label": ["label"],
        "standard": ["label", "top_k", "probabilities", "embedding"],
        "research": ["label", "top_k", "probabilities", "logits", "embedding"],
    }


class ModelCard(BaseModel):
    """Everything known about a checkpoint; ``card.json`` on disk."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    kind: ModelKind
    architecture: str
    input: InputSpec
    mean: list[float]
    std: list[float]
    classes: list[str] = Field(default_factory=list)
    feature_dim: int
    projection_dim: int = 128
    dataset: str = ""
    description: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    tiers: dict[str, list[OutputMode]] = Field(
        default_factory=_default_tiers,
        description="Output modes each key tier may use with this model.",
    )
    sha256: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        if len(self.mean) != self.input.channels or len(self.std) != self.input.channels:
            raise ValueError("mean and std need one value per input channel")
        if self.kind == "classifier" and len(self.classes) < 2:
            raise ValueError("a classifier card needs at least two class names")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def output_modes(self) -> tuple[OutputMode, ...]:
        """The modes this kind of model can produce at all."""
        return CLASSIFIER_MODES if self.kind == "classifier" else ENCODER_MODES

    def modes_for_tier(self, tier: str) -> list[OutputMode]:
        """Modes a key of ``tier`` may request: the card's list, restricted to what the model makes."""
        return [m for m in self.tiers.get(tier, []) if m in self.output_modes]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_for(model: ImageModel, name: str, architecture: str, **fields: Any) -> ModelCard:
    """Build a card describing ``model`` (kind, normalisation, dims) plus the given fields."""
    mean = model.normalize.mean.flatten().tolist()
    std = model.normalize.std.flatten().tolist()
    return ModelCard(
        name=name,
        kind=model.kind,
        architecture=architecture,
        mean=mean,
        std=std,
        feature_dim=model.feature_dim,
        projection_dim=getattr(model, "projection_dim", 128),
        **fields,
    )


def save_checkpoint(model: ImageModel, card: ModelCard, directory: str | Path) -> ModelCard:
    """Write ``model.safetensors`` and ``card.json`` (with the weights' sha256) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"name": card.name, "kind": card.kind})
    tmp.replace(weights)
    card = card.model_copy(update={"sha256": sha256_file(weights)})
    (directory / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    return card


def read_card(directory: str | Path) -> ModelCard:
    """Parse and validate ``card.json``; a bad card raises a ValueError naming the file."""
    path = Path(directory) / CARD_FILE
    try:
        return ModelCard.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"invalid model card {path}: {exc}") from exc


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[ImageModel, ModelCard]:
    """Rebuild the model of a checkpoint folder, after checking the weights' sha256 against the card."""
    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS_FILE
    actual = sha256_file(weights)
    if card.sha256 and actual != card.sha256:
        raise ValueError(f"{weights}: sha256 {actual} does not match the card's {card.sha256}")
    model = build_model(
        card.kind,
        card.architecture,
        card.input.channels,
        card.mean,
        card.std,
        num_classes=max(card.num_classes, 1),
        feature_dim=card.feature_dim,
        projection_dim=card.projection_dim,
    )
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    model.to(device).eval()
    return model, card

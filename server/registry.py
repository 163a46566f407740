"""The model registry: every checkpoint folder of the model store, loaded once at startup.

A bad store stops startup with a clear message (missing or invalid card, weights whose sha256 does
not match the card, duplicate names) rather than serving half of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import defenses.output  # noqa: F401  (registers the output defenses)
from common.checkpoints import CARD_FILE, ModelCard, OutputMode, load_checkpoint
from common.models import ImageModel
from defenses.base import DefenseContext, DefensePipeline
from defenses.config import DEFAULT_TIER, load_defense_config
from defenses.detectors import Detector
from server.errors import NotFoundError
from server.graphs import serving_graph
from server.settings import GraphMode

# Output tensor name -> the output mode a key's tier must allow to receive it.
OUTPUT_MODES: dict[str, OutputMode] = {
    "logits": "logits",
    "probabilities": "probabilities",
    "label": "label",
    "top_k_indices": "top_k",
    "top_k_probabilities": "top_k",
    "embedding": "embedding",
}
# Outputs sent when a request names none: the richest mode the tier allows, in this order.
DEFAULT_PREFERENCE: dict[str, list[list[str]]] = {
    "classifier": [["probabilities"], ["top_k_indices", "top_k_probabilities"], ["label"], ["logits"]],
    "encoder": [["embedding"]],
}


class ModelStoreError(RuntimeError):
    """The model store cannot be served as it is."""


@dataclass
class ServedModel:
    """A loaded checkpoint and what the API needs to know about it."""

    card: ModelCard
    model: ImageModel
    device: torch.device
    output_names: list[str] = field(default_factory=list)
    defenses: dict[str, DefensePipeline] = field(default_factory=dict)  # tier or "*" -> pipeline
    profiles: dict[str, DefensePipeline] = field(default_factory=dict)  # key's defense_profile -> pipeline
    detector: Detector | None = None
    graph: nn.Module | None = None  # the forward as a frozen TorchScript graph (server.graphs), or eager

    @property
    def name(self) -> str:
        return self.card.name

    def pipeline_for(self, tier: str, profile: str | None = None) -> DefensePipeline:
        """The key's profile's pipeline where this model defines it, else the tier's own, else the
        model's default. A configured empty pipeline (``"tiers": {"research": []}``) is kept: it
        serves undefended, it does not fall back to the default."""
        if profile is not None and profile in self.profiles:
            return self.profiles[profile]
        if tier in self.defenses:
            return self.defenses[tier]
        if DEFAULT_TIER in self.defenses:
            return self.defenses[DEFAULT_TIER]
        return DefensePipeline()

    def outputs_for_tier(self, tier: str) -> list[str]:
        modes = set(self.card.modes_for_tier(tier))
        return [name for name in self.output_names if OUTPUT_MODES[name] in modes]

    def default_outputs(self, tier: str) -> list[str]:
        allowed = set(self.outputs_for_tier(tier))
        for group in DEFAULT_PREFERENCE[self.card.kind]:
            if set(group) <= allowed:
                return group
        return []

    def to_model_input(self, images: np.ndarray) -> torch.Tensor:
        """A batch the service validated (:func:`server.service.check_images`: uint8, or float32
        within [0, 1], of the card's shape) as [0, 1] floats on the model's device."""
        x = torch.from_numpy(np.array(images, copy=True)).to(self.device)
        return x.float().div_(255) if images.dtype == np.uint8 else x

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The undefended outputs (embeddings, or probabilities) and, for classifiers, the logits:
        through the serving graph when there is one (no GIL taken during the forward)."""
        if self.graph is not None:
            values, logits = self.graph(x)
            return (values, None) if self.card.kind == "encoder" else (values, logits)
        if self.card.kind == "encoder":
            return self.model.features(x).float(), None
        logits = self.model(x).float()
        return torch.softmax(logits, dim=1), logits

    @torch.inference_mode()
    def finish(
        self,
        raw: tuple[torch.Tensor, torch.Tensor | None],
        outputs: list[str],
        top_k: int,
        pipeline: DefensePipeline | None = None,
        context: DefenseContext | None = None,
    ) -> dict[str, np.ndarray]:
        """Apply the defense pipeline to :meth:`forward`'s outputs (embeddings, or probabilities)
        and derive every requested output tensor from the defended values. A defended classifier's
        logits are ``log`` of its defended probabilities (zeros floored at 1e-30)."""
        values, logits = raw
        if self.card.kind == "encoder":
            if pipeline and context is not None:
                values = pipeline.apply(values, context)
            return {"embedding": values.cpu().numpy()}
        assert logits is not None
        result: dict[str, np.ndarray] = {}
        probabilities = values
        if pipeline and context is not None:
            probabilities = pipeline.apply(probabilities, context).float()
            logits = torch.log(probabilities.clamp_min(1e-30))
        for name in outputs:
            if name == "logits":
                result[name] = logits.cpu().numpy()
            elif name == "probabilities":
                result[name] = probabilities.cpu().numpy()
            elif name == "label":
                result[name] = logits.argmax(dim=1).cpu().numpy().astype(np.int64)
            elif name in ("top_k_indices", "top_k_probabilities"):
                values, indices = probabilities.topk(min(top_k, self.card.num_classes), dim=1)
                result["top_k_indices"] = indices.cpu().numpy().astype(np.int64)
                result["top_k_probabilities"] = values.cpu().numpy()
        return {name: result[name] for name in outputs}

    def compute(
        self,
        x: torch.Tensor,
        outputs: list[str],
        top_k: int,
        pipeline: DefensePipeline | None = None,
        context: DefenseContext | None = None,
    ) -> dict[str, np.ndarray]:
        """:meth:`forward` then :meth:`finish`: stateless pipelines only (stateful ones need Redis)."""
        return self.finish(self.forward(x), outputs, top_k, pipeline, context)


class ModelRegistry:
    """Name -> :class:`ServedModel` for every checkpoint folder directly under the store."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self.models = models

    @classmethod
    def load(
        cls, store: Path, device: str | torch.device = "cpu", graph_mode: GraphMode = "torchscript"
    ) -> ModelRegistry:
        """Every checkpoint of ``store`` on ``device``; ``graph_mode`` "torchscript" runs each
        forward as a frozen TorchScript graph (:mod:`server.graphs`), "eager" as the module."""
        store = Path(store)
        if not store.is_dir():
            raise ModelStoreError(f"model store {store} is not a folder (set STEALRANGE_MODEL_STORE)")
        device = torch.device(device)
        models: dict[str, ServedModel] = {}
        for folder in sorted(p for p in store.iterdir() if (p / CARD_FILE).is_file()):
            try:
                model, card = load_checkpoint(folder, device)
                config = load_defense_config(folder)
                pipelines = config.pipelines(card.kind)
                profiles = config.profile_pipelines(card.kind)
                detector = config.build_detector(card.kind)
                bound = [
                    *pipelines.values(),
                    *profiles.values(),
                    *([detector.fallback] if detector and detector.fallback else []),
                ]
                for pipeline in bound:
                    pipeline.bind(model, card, folder)
            except Exception as exc:
                raise ModelStoreError(f"cannot serve {folder}: {exc}") from exc
            if card.name in models:
                raise ModelStoreError(f"two checkpoints are named {card.name!r} in {store}")
            names = ["embedding"] if card.kind == "encoder" else [n for n in OUTPUT_MODES if n != "embedding"]
            models[card.name] = ServedModel(
                card=card,
                model=model,
                device=device,
                output_names=names,
                defenses=pipelines,
                profiles=profiles,
                detector=detector,
                graph=serving_graph(model, card, device) if graph_mode == "torchscript" else None,
            )
        return cls(models)

    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise NotFoundError(f"model {name!r} not found", code="model_not_found") from None

    def names(self) -> list[str]:
        return sorted(self.models)

    def profiles(self) -> set[str]:
        """Every defense profile some served model defines (what a key's ``defense_profile`` may name)."""
        return {name for served in self.models.values() for name in served.profiles}

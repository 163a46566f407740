"""Which defenses a served model applies: ``defenses.json`` beside the model's ``card.json``.

    {"default": [{"name": "reverse_sigmoid", "beta": 0.7, "gamma": 0.2}, {"name": "top_k", "k": 3}],
     "tiers": {"research": []},
     "detector": {"name": "prada", "delta": 0.95, "action": "refuse"}}

``default`` is the pipeline for every key; ``tiers`` overrides it for keys of a tier (an empty list
serves that tier undefended); ``profiles`` names pipelines an admin assigns to single keys (a key's
``defense_profile``, e.g. a stronger pipeline for a key under suspicion): a key's profile wins over
its tier where the model defines it. ``detector`` (optional, a :class:`defenses.detectors.Detector`
by registered name, e.g. PRADA) watches every key's query stream.
The file lives apart from the card so an operator can change a model's defenses without touching
the trained artefact. A missing file means undefended. Every spec is
built when the server starts, so a typo stops the start-up with a message naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.models import ModelKind
from defenses.base import DefensePipeline
from defenses.detectors import Detector, build_detector

DEFENSES_FILE = "defenses.json"
DEFAULT_TIER = "*"


class DefenseConfig(BaseModel):
    """Pipelines of one model: a default and per-tier overrides (lists of ``{"name", **params}``)."""

    model_config = ConfigDict(extra="forbid")

    default: list[dict[str, Any]] = Field(default_factory=list)
    tiers: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    profiles: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    detector: dict[str, Any] | None = None

    def pipelines(self, kind: ModelKind) -> dict[str, DefensePipeline]:
        """``{"*": default pipeline, tier: pipeline, ...}``, every spec built and checked."""
        out = {DEFAULT_TIER: DefensePipeline.from_specs(self.default, kind)}
        for tier, specs in self.tiers.items():
            out[tier] = DefensePipeline.from_specs(specs, kind)
        return out

    def profile_pipelines(self, kind: ModelKind) -> dict[str, DefensePipeline]:
        """``{profile: pipeline}`` of the named per-key profiles, every spec built and checked."""
        return {name: DefensePipeline.from_specs(specs, kind) for name, specs in self.profiles.items()}

    def build_detector(self, kind: ModelKind) -> Detector | None:
        """The configured detector, checked (its ``defend_with`` pipeline built), or None."""
        if self.detector is None:
            return None
        detector = build_detector(self.detector)
        detector.check(kind)
        return detector


def load_defense_config(folder: str | Path) -> DefenseConfig:
    """Read ``folder/defenses.json`` (an empty config if there is none); errors name the file."""
    path = Path(folder) / DEFENSES_FILE
    if not path.is_file():
        return DefenseConfig()
    try:
        return DefenseConfig.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"invalid defense config {path}: {exc}") from exc


def write_defense_config(folder: str | Path, config: DefenseConfig) -> Path:
    """Write ``folder/defenses.json``."""
    path = Path(folder) / DEFENSES_FILE
    path.write_text(config.model_dump_json(indent=2) + "\n")
    return path

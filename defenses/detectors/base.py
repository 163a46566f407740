"""The contract of a stateful detector of extraction query streams, and its registry (:data:`DETECTORS`).

A detector watches every query of a key on a served model (``defenses.json``'s ``detector``) and,
when it concludes that the key is extracting the model, *flags* it: a record in the key's flags hash
(:meth:`defenses.state.DefenseStore.flags_key`), shown in ``GET /v1/usage`` and the admin API. What
the server does with a flagged key is the detector's ``action`` (every detector has it, in
:class:`DetectorParams`): ``flag`` only records it, ``refuse`` answers the key's further queries
with 403 ``extraction_suspected``, ``defend`` serves them through the :attr:`Detector.fallback`
pipeline built from ``defend_with``.

The server knows detectors only through this contract:

- :meth:`Detector.check` once at start-up (builds ``fallback`` for the model's kind; a bad spec
  stops the start);
- :meth:`Detector.flag_of` before a request (the key's flag on the model, or None);
- :meth:`Detector.observe` after the forward pass, with the request's input images and the classes
  the model predicted;
- :meth:`Detector.state` for the admin API (the detector's statistics of the key).

A detector keeps its state in Redis through the :class:`defenses.state.DefenseStore` (never in a
worker alone), so every worker and replica sees one query stream per key; :meth:`Detector.raise_flag`
writes the flag record every detector shares.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from common.models import ModelKind
from common.registry import Configurable, Params, Registry
from defenses.base import DefensePipeline
from defenses.state import DefenseStore

FLAG = "extraction_suspected"


class DetectorParams(Params):
    """What every detector's parameters have: the action on detection and its fallback pipeline."""

    action: Literal["flag", "refuse", "defend"] = Field(
        "flag", description="on detection: only flag, refuse with 403, or serve through defend_with"
    )
    defend_with: list[dict[str, Any]] = Field(
        default_factory=list, description="pipeline for flagged keys (action=defend)"
    )

    @model_validator(mode="after")
    def _defend(self) -> DetectorParams:
        if self.action == "defend" and not self.defend_with:
            raise ValueError("action 'defend' needs a defend_with pipeline")
        return self


@dataclass(frozen=True)
class Detection:
    """The detector's state for one key after a request."""

    distances: int  # observations the detector has counted for the key (PRADA: distances)
    w: float | None  # the test statistic, once there is enough to test
    flagged: bool
    newly_flagged: bool


class Detector(Configurable, abc.ABC):
    """Base class: declared parameters (with ``action``, ``defend_with``) checked at construction,
    per-key state in a :class:`DefenseStore`."""

    Params: ClassVar[type[DetectorParams]] = DetectorParams
    params: DetectorParams

    def __init__(self, params: DetectorParams | dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(params, **overrides)
        self.fallback: DefensePipeline | None = None  # built by check() when action is "defend"

    def check(self, kind: ModelKind) -> None:
        """Build the ``defend_with`` pipeline for this kind of model (a bad spec stops startup)."""
        if self.params.action == "defend":
            self.fallback = DefensePipeline.from_specs(self.params.defend_with, kind)

    async def flag_of(self, store: DefenseStore, key_id: str, model: str) -> dict[str, Any] | None:
        """The key's flag record on ``model`` (whichever detector raised it), or None."""
        raw = await store.redis.hget(store.flags_key(key_id), model)
        return None if raw is None else json.loads(raw)

    async def raise_flag(
        self, store: DefenseStore, key_id: str, model: str, facts: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Flag the key on ``model`` with ``facts`` (the statistics behind it) unless it is flagged
        already: (the record, whether this call wrote it)."""
        record = {
            "flag": FLAG,
            "detector": self.name,
            **facts,
            "at": time.time(),
            "action": self.params.action,
        }
        newly = bool(await store.redis.hsetnx(store.flags_key(key_id), model, json.dumps(record)))
        return record, newly

    @abc.abstractmethod
    async def observe(
        self, store: DefenseStore, key_id: str, model: str, inputs: torch.Tensor, classes: list[int]
    ) -> Detection:
        """Take one request's input images (``[n, C, H, W]`` in [0, 1], batch order) and the classes
        the model predicted (encoders: all 0); test, and flag the key on detection."""

    @abc.abstractmethod
    async def state(self, store: DefenseStore, key_id: str, model: str) -> dict[str, Any]:
        """What the admin API shows of the key on ``model``: the detector's statistics and the flag."""


# Every detector by name: ``@DETECTORS.register``.
DETECTORS = Registry[type[Detector]]("detector")


def build_detector(spec: dict[str, Any]) -> Detector:
    """A detector from ``{"name": ..., **params}`` (as ``defenses.json`` or a scenario names it)."""
    if "name" not in spec:
        raise ValueError(f"a detector spec needs a 'name': {spec}")
    return DETECTORS.build(str(spec["name"]), {k: v for k, v in spec.items() if k != "name"})

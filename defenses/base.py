"""The contract of an output defense, its request context, pipelines, and the registry by name
(:data:`DEFENSES`).

As ART's postprocessors: a defense is a small, batch-wise transform of a model's outputs, with its
parameters in a pydantic model checked when it is built (so a bad configuration stops the server's
startup with a clear message). Classifier defenses transform probabilities ``[n, C]`` into
probabilities (the served label, top-k and logits are derived from the defended probabilities);
encoder defenses transform embeddings ``[n, d]``.

Random defenses draw their noise from :meth:`DefenseContext.generator`, seeded by
HMAC-SHA256(server secret, key id | model | input digest | defense salt): the same key asking the
same image again gets the same answer (so noise cannot be averaged away by re-asking), another key
gets other noise, and nobody without the server secret can predict it.

Two optional hooks serve the defenses that need more than the outputs:

- :meth:`OutputDefense.bind` hands a defense the served model, its card and its folder when the
  server loads it (MAD builds its gradient proxy from the architecture; Adaptive Misinformation
  loads its misinformation model from the folder). The context then carries the model's ``inputs``.
- Stateful defenses (``stateful = True``, e.g. B4B) keep per-key state in Redis:
  :meth:`OutputDefense.observe` runs in the event loop before :meth:`OutputDefense.apply`, updates
  the state through a :class:`defenses.state.DefenseStore` and leaves what ``apply`` needs in
  ``context.state[defense.name]``. State lives in Redis, never in a worker, so it holds across
  workers and replicas; :meth:`OutputDefense.key_state` shows a key's state (the admin API).
"""

from __future__ import annotations

import abc
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from common.models import ModelKind
from common.registry import Configurable, Params, Registry

if TYPE_CHECKING:
    from common.checkpoints import ModelCard
    from common.models import ImageModel
    from defenses.state import DefenseStore


def image_digests(images: np.ndarray) -> list[bytes]:
    """SHA-256 of every image's raw bytes (dtype and shape included), in batch order."""
    return [
        hashlib.sha256(
            f"{image.dtype.str}{image.shape}".encode() + np.ascontiguousarray(image).tobytes()
        ).digest()
        for image in images
    ]


@dataclass(frozen=True)
class DefenseContext:
    """Who asks what: the key, the model, one digest per input image, and the server's secret.

    ``inputs`` are the model's input images as ``[0, 1]`` floats (for defenses that look at them);
    ``state`` is where stateful defenses leave, per request, what they read from Redis.
    """

    key_id: str
    model: str
    digests: Sequence[bytes]
    secret: bytes  # required and non-empty: without it anyone could recompute the keyed noise
    inputs: torch.Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("a defense context needs the server secret (an empty secret is no secret)")

    def keyed_seed(self, salt: str) -> int:
        """A 63-bit seed of (secret, key, model, ``salt``) alone: the same for every image of a key."""
        message = b"|".join([self.key_id.encode(), self.model.encode(), salt.encode()])
        return int.from_bytes(hmac.new(self.secret, message, hashlib.sha256).digest()[:8], "big") >> 1

    def seed(self, index: int, salt: str) -> int:
        """A 63-bit seed for image ``index`` of the batch and a defense ``salt``."""
        message = b"|".join([self.key_id.encode(), self.model.encode(), self.digests[index], salt.encode()])
        return int.from_bytes(hmac.new(self.secret, message, hashlib.sha256).digest()[:8], "big") >> 1

    def generator(self, index: int, salt: str) -> torch.Generator:
        """A CPU generator seeded by :meth:`seed`."""
        return torch.Generator().manual_seed(self.seed(index, salt))

    def per_sample(self, salt: str, draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        """Stack ``draw(generator)`` over the batch, one deterministic generator per image."""
        return torch.stack([draw(self.generator(i, salt)) for i in range(len(self.digests))])


class DefenseParams(Params):
    """Base of every defense's parameters: frozen, unknown names rejected."""


class OutputDefense(Configurable, abc.ABC):
    """Base class: declared parameters validated at construction and a batch-wise :meth:`apply`."""

    kinds: ClassVar[frozenset[ModelKind]]
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    stateful: ClassVar[bool] = False  # keeps per-key state in Redis (see observe)
    needs_model: ClassVar[bool] = False  # must be bound to the served model before use

    def bind(self, model: ImageModel, card: ModelCard, folder: Path | None) -> None:
        """Called once when the server (or ``defenses cost``) loads the model; a no-op by default."""

    async def observe(self, outputs: torch.Tensor, context: DefenseContext, store: DefenseStore) -> None:
        """Stateful defenses: update per-key state from the undefended ``outputs`` (a no-op by default)."""

    async def key_state(self, store: DefenseStore, key_id: str, model: str) -> dict[str, Any] | None:
        """Stateful defenses: what the admin API shows of ``key_id``'s state on ``model``; None (the
        default) when the defense keeps none."""
        return None

    @abc.abstractmethod
    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        """Defended outputs of the same shape: probabilities for classifiers, embeddings for encoders."""


# Every output defense by name: ``@DEFENSES.register`` (timm-style registry).
DEFENSES = Registry[type[OutputDefense]]("defense")


def build_defense(spec: dict[str, Any]) -> OutputDefense:
    """Build a defense from ``{"name": ..., **params}`` (as a scenario or model store names it)."""
    if "name" not in spec:
        raise ValueError(f"a defense spec needs a 'name': {spec}")
    params = {k: v for k, v in spec.items() if k != "name"}
    return DEFENSES.build(str(spec["name"]), params)


class DefensePipeline:
    """Several defenses applied in order; empty means undefended."""

    def __init__(self, defenses: Sequence[OutputDefense] = ()) -> None:
        self.defenses = list(defenses)

    @classmethod
    def from_specs(cls, specs: Sequence[dict[str, Any]], kind: ModelKind) -> DefensePipeline:
        """Build and check every spec; a defense for another kind of model is an error."""
        defenses = [build_defense(dict(spec)) for spec in specs]
        for defense in defenses:
            if kind not in defense.kinds:
                raise ValueError(f"defense {defense.name!r} does not apply to {kind} models")
        return cls(defenses)

    def __bool__(self) -> bool:
        return bool(self.defenses)

    @property
    def stateful(self) -> bool:
        """Whether any defense keeps per-key state (the request path then awaits :meth:`observe`)."""
        return any(d.stateful for d in self.defenses)

    def bind(self, model: ImageModel, card: ModelCard, folder: Path | None) -> None:
        for defense in self.defenses:
            defense.bind(model, card, folder)

    async def observe(self, outputs: torch.Tensor, context: DefenseContext, store: DefenseStore) -> None:
        """Every stateful defense observes the undefended outputs, in pipeline order."""
        for defense in self.defenses:
            if defense.stateful:
                await defense.observe(outputs, context, store)

    def __repr__(self) -> str:
        return " -> ".join(map(repr, self.defenses)) or "undefended"

    def apply(self, outputs: torch.Tensor, context: DefenseContext) -> torch.Tensor:
        for defense in self.defenses:
            outputs = defense.apply(outputs, context)
        return outputs

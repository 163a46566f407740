"""The contract of an encoder-stealing attack: the ``encoder`` family's base class.

Layered as ART's attacks are: each attack lives in its own file, derives from :class:`EncoderAttack`
(an :class:`~attacker_client.attacks.contract.Attack`), declares its parameters as a pydantic model
(checked when the attack is built, so a typo in a scenario fails before any query is spent),
registers itself in :data:`~attacker_client.attacks.contract.ATTACKS` and implements one method,
:meth:`EncoderAttack.steal`. The attack sees the victim only
through an *oracle*: a function from uint8 images ``[n, C, H, W]`` to float32 embeddings
``[n, d]``; in this project that is :meth:`attacker_client.client.VictimClient.embed`, so every
image the attack asks for is a paid query on the victim's API (unless the client's cache has it).

Every random choice (which query samples, which views) comes from generators seeded by the
attack's ``seed``, and the query views are made on the CPU, so the same command asks for the same
bytes again and a rerun is served from the client's cache for free.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from attacker_client.attacks.contract import SURROGATE_MEAN, SURROGATE_STD, Attack, AttackParams
from common.datasets import ImageData
from common.devices import move_to
from common.models import BACKBONES, Encoder, ImageModel, build_model
from common.training import StepFn, TrainConfig, run_steps
from common.views import ViewConfig, ViewGenerator, to_uint8

EmbedOracle = Callable[[np.ndarray], np.ndarray]
"""uint8 images [n, C, H, W] -> float32 embeddings [n, d]; every image is one query."""

ViewPreset = Literal["none", "simclr", "rda_prototype", "rda_train", "stolen_encoder"]

VIEW_CHUNK = 256  # samples per view-generation call; fixed so the random stream never depends on it


class CleanViews(ViewGenerator):
    """The ``none`` preset: every view is the clean image (same interface, no randomness drawn)."""

    def __init__(self) -> None:
        super().__init__(ViewConfig())

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.to(torch.float32, copy=True)


def view_generator(preset: ViewPreset) -> ViewGenerator:
    """The :class:`ViewGenerator` of a preset name (``none``: :class:`CleanViews`)."""
    if preset == "none":
        return CleanViews()
    return ViewGenerator(getattr(ViewConfig, preset)())


class EncoderAttackParams(AttackParams):
    """Parameters every encoder attack shares; each attack adds its own and may change defaults.

    The defaults are RDA's released training setup (Wu et al., ECCV 2024): Adam, lr 1e-3, weight
    decay 1e-4, batch 100, 100 epochs. ``architecture`` is the surrogate's backbone (the paper uses a
    ResNet-18; the quick profile the small CNN); its output width is the victim's embedding width.
    """

    architecture: str = Field("small_cnn", description="surrogate backbone (a registered name)")
    epochs: int = Field(100, ge=1, description="training epochs over the query samples")
    batch_size: int = Field(100, ge=2, description="query samples per step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning-rate schedule")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (smoke runs)")

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in BACKBONES.names():
            raise ValueError(f"unknown surrogate architecture {value!r}; known: {BACKBONES.names()}")
        return value

    def train_config(self, device: torch.device) -> TrainConfig:
        """The :class:`TrainConfig` of the surrogate's training loop."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="adam",
            lr=self.lr,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            seed=self.seed,
            device=str(device),
            max_steps=self.max_steps,
        )


@dataclass
class StealingResult:
    """What :meth:`EncoderAttack.steal` returns."""

    surrogate: ImageModel
    history: list[dict[str, float]]
    samples: int  # query samples used
    queries: int  # images sent to the oracle (the server's usage is the authority on what was paid)
    query_seconds: float
    train_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class EncoderAttack(Attack):
    """Base of the ``encoder`` family: a query plan, helpers, and :meth:`steal`."""

    family: ClassVar[str] = "encoder"
    Params: ClassVar[type[EncoderAttackParams]] = EncoderAttackParams
    params: EncoderAttackParams

    # -- the query plan ----------------------------------------------------------------------

    @abc.abstractmethod
    def queries_per_sample(self) -> int:
        """Victim queries each query sample costs over the whole attack."""

    def samples_for(self, budget: int, pool_size: int) -> int:
        """How many query samples fit in ``budget`` (and in the pool); at least 2 or an error."""
        if budget < 1:
            raise ValueError(f"budget must be >= 1 query, got {budget}")
        n = min(pool_size, budget // self.queries_per_sample())
        if n < 2:
            raise ValueError(
                f"{self.name}: a budget of {budget} queries buys {n} query samples at "
                f"{self.queries_per_sample()} queries each; at least 2 are needed"
            )
        return n

    def choose_samples(self, pool: ImageData, budget: int) -> ImageData:
        """A seeded random subset of the pool, as large as the budget allows."""
        n = self.samples_for(budget, len(pool))
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.params.seed))
        return pool.subset(order[:n])

    # -- helpers for the attacks -------------------------------------------------------------

    def build_surrogate(self, pool: ImageData, embedding_dim: int) -> Encoder:
        """A fresh surrogate encoder whose representation has the victim's width (seeded init)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            model = build_model(
                "encoder",
                self.params.architecture,
                pool.channels,
                [SURROGATE_MEAN] * pool.channels,
                [SURROGATE_STD] * pool.channels,
                feature_dim=embedding_dim,
            )
        assert isinstance(model, Encoder)
        return model

    @staticmethod
    def make_views(
        images: torch.Tensor, n_views: int, views: ViewGenerator, generator: torch.Generator
    ) -> torch.Tensor:
        """``n_views`` uint8 views of every uint8 image, made on the CPU: ``[n, n_views, C, H, W]``.

        Generated :data:`VIEW_CHUNK` samples at a time, so memory stays small and the random stream,
        hence the bytes asked for, does not depend on the machine.
        """
        out = torch.empty((images.shape[0], n_views, *images.shape[1:]), dtype=torch.uint8)
        for start in range(0, images.shape[0], VIEW_CHUNK):
            v = views.views(images[start : start + VIEW_CHUNK].float() / 255.0, n_views, generator)
            out[start : start + VIEW_CHUNK] = to_uint8(v).transpose(0, 1)
        return out

    @staticmethod
    def query(oracle: EmbedOracle, images: torch.Tensor) -> torch.Tensor:
        """Ask the oracle for the embeddings of uint8 images ``[..., C, H, W]``: ``[..., d]``."""
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:]).numpy()
        embeddings = np.asarray(oracle(flat), dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != flat.shape[0]:
            raise ValueError(f"the oracle returned {embeddings.shape} for {flat.shape[0]} images")
        return torch.from_numpy(embeddings.copy()).reshape(*lead, embeddings.shape[1])

    def train(
        self,
        surrogate: ImageModel,
        n_samples: int,
        step: StepFn,
        device: torch.device,
        progress: bool | None,
    ) -> tuple[list[dict[str, float]], float]:
        """Run the surrogate's training loop; returns (history, seconds).

        ``step(net, batch, generator)`` calls ``net`` (the surrogate's representation, DDP-wrapped
        under ``torchrun``) for its forward.
        """
        started = time.perf_counter()
        move_to(surrogate, device)
        history = run_steps(
            surrogate,
            n_samples,
            step,
            self.params.train_config(device),
            description=self.name,
            progress=progress,
            net=surrogate.representation(),
        )
        return history, time.perf_counter() - started

    @abc.abstractmethod
    def steal(
        self,
        oracle: EmbedOracle,
        pool: ImageData,
        budget: int,
        device: torch.device,
        progress: bool | None = None,
    ) -> StealingResult:
        """Spend at most ``budget`` queries of ``oracle`` on images of ``pool``; train a surrogate."""

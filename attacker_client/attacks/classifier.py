"""The contract of a classifier-stealing attack (the ``classifier`` family's base class,
:class:`ClassifierAttack`), and the victim's answers as training targets.

A classifier attack sees the victim through a :class:`ClassifierOracle`: uint8 images in, one
target distribution per image out, whatever the key may ask for (its :data:`AnswerMode`):

- ``probabilities``: the victim's posterior as it is;
- ``top_k``: the ``k`` largest probabilities (a truncated posterior, Orekondy et al., CVPR 2019,
  section 6); the missing mass is spread evenly over the other classes (``top_k_fill="uniform"``,
  the common choice) or dropped and the ``k`` renormalised (``"renormalize"``);
- ``label``: the argmax alone, a one-hot target (label-only stealing: plain cross-entropy).

Soft targets are distilled with temperature ``T`` as Hinton et al. (2015) do:
``T^2 * CE(softmax(p^(1/T)), log_softmax(z / T))``, where sharpening or softening the victim's
probabilities by ``p^(1/T)`` renormalised equals ``softmax(logits / T)`` of its (unseen) logits.
At ``T = 1`` this is Knockoff Nets' soft cross-entropy. Hard labels always use plain
cross-entropy.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from attacker_client.attacks.contract import SURROGATE_MEAN, SURROGATE_STD, Attack, AttackParams
from common.datasets import ImageData
from common.devices import autocast, move_to
from common.models import BACKBONES, Classifier, build_model
from common.training import EpochHook, TrainConfig, batch_to_device, batches_per_epoch, run_steps

if TYPE_CHECKING:
    from attacker_client.uq.base import Monitor

AnswerMode = Literal["probabilities", "top_k", "label"]
"""What a classifier attack asks the victim for (the served output modes it can learn from; the
server's own output modes are :data:`common.checkpoints.OutputMode`)."""


@dataclass(frozen=True)
class ClassifierOracle:
    """The victim as a classifier attack sees it: ``ask(uint8 [n, C, H, W]) -> targets [n, classes]``
    (float32 rows summing to 1; one-hot when ``mode`` is ``label``). Every image is one query."""

    ask: Callable[[np.ndarray], np.ndarray]
    num_classes: int
    mode: AnswerMode = "probabilities"

    @property
    def hard_labels(self) -> bool:
        return self.mode == "label"


def answers_to_targets(
    answer: np.ndarray | tuple[np.ndarray, np.ndarray],
    mode: AnswerMode,
    num_classes: int,
    top_k_fill: Literal["uniform", "renormalize"] = "uniform",
) -> np.ndarray:
    """The victim's answer in ``mode`` as target distributions ``[n, num_classes]`` (float32)."""
    if mode == "probabilities":
        probs = np.asarray(answer, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != num_classes:
            raise ValueError(f"expected probabilities [n, {num_classes}], got {probs.shape}")
        probs = np.clip(probs, 0.0, None)
        return (probs / probs.sum(axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
    if mode == "label":
        labels = np.asarray(answer, dtype=np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels outside 0..{num_classes - 1}")
        return np.eye(num_classes, dtype=np.float32)[labels]
    if mode == "top_k":
        if not isinstance(answer, tuple) or len(answer) != 2:
            raise ValueError("top_k answers are (indices [n, k], probabilities [n, k])")
        indices = np.asarray(answer[0], dtype=np.int64)
        probs = np.clip(np.asarray(answer[1], dtype=np.float64), 0.0, None)
        n, k = indices.shape
        targets = np.zeros((n, num_classes), dtype=np.float64)
        np.put_along_axis(targets, indices, probs, axis=1)
        if top_k_fill == "uniform" and k < num_classes:
            rest = (1.0 - probs.sum(axis=1, keepdims=True)).clip(0.0) / (num_classes - k)
            targets = np.where(targets > 0, targets, rest)
            np.put_along_axis(targets, indices, probs, axis=1)
        return (targets / targets.sum(axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
    raise ValueError(f"unknown output mode {mode!r}")


def distillation_loss(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, hard_labels: bool = False
) -> torch.Tensor:
    """Knowledge-distillation loss of student ``logits`` against target distributions (see module).

    ``hard_labels``: cross-entropy to the targets' argmax (temperature unused). Otherwise
    ``T^2 * mean_i sum_c -q_ic log softmax(z_i / T)_c`` with ``q = normalise(targets^(1/T))``.
    """
    if hard_labels:
        return F.cross_entropy(logits.float(), targets.argmax(dim=1))
    q = targets.float().clamp_min(0)
    if temperature != 1.0:
        q = q.clamp_min(1e-12).pow(1.0 / temperature) * (targets > 0)
    q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
    log_student = F.log_softmax(logits.float() / temperature, dim=1)
    return -(q * log_student).sum(dim=1).mean() * temperature**2


class ClassifierAttackParams(AttackParams):
    """Parameters every classifier attack shares.

    The defaults are Knockoff Nets' released training setup (Orekondy et al., CVPR 2019,
    ``knockoffnets`` repository): SGD, lr 0.01, momentum 0.5, weight decay 5e-4, batch 64, 100
    epochs with the lr divided by 10 at epoch 60, soft labels at temperature 1, random transfer set.
    The quick profile overrides epochs.
    """

    architecture: str = Field("small_cnn", description="surrogate backbone (a registered name)")
    feature_dim: int = Field(128, ge=2, description="surrogate's penultimate width")
    epochs: int = Field(100, ge=1, description="training epochs over the transfer set")
    batch_size: int = Field(64, ge=2)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lr_step: int | None = Field(60, ge=1, description="epoch at which lr is divided by 10 (null: never)")
    temperature: float = Field(1.0, gt=0, description="distillation temperature for soft labels")
    output: Literal["auto", "probabilities", "top_k", "label"] = Field(
        "auto", description="what to ask the victim for; auto: the richest mode the key allows"
    )
    top_k: int = Field(3, ge=1, description="k when asking for top-k")
    top_k_fill: Literal["uniform", "renormalize"] = Field(
        "uniform", description="top-k: spread the missing mass over the other classes, or renormalise"
    )
    sampling: Literal["random", "class_balanced"] = Field(
        "random", description="transfer set: random, or balanced over the pool's own labels"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (smoke runs)")
    monitor_every: int | None = Field(
        None, ge=1, description="log members' predictions every this many steps (null: every epoch)"
    )

    def steps_per_epoch(self, n: int) -> int:
        """Optimizer steps per epoch over ``n`` transfer samples."""
        return batches_per_epoch(n, self.batch_size)

    def total_steps(self, n: int) -> int:
        """Optimizer steps of one network's training over ``n`` transfer samples."""
        total = self.epochs * self.steps_per_epoch(n)
        return total if self.max_steps is None else min(total, self.max_steps)

    def is_monitor_step(self, done: int, n: int) -> bool:
        """True after the steps at which the members' predictions are logged (and the last one)."""
        every = self.monitor_every or self.steps_per_epoch(n)
        return done % every == 0 or done == self.total_steps(n)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in BACKBONES.names():
            raise ValueError(f"unknown surrogate architecture {value!r}; known: {BACKBONES.names()}")
        return value

    def train_config(self, device: torch.device, seed: int | None = None) -> TrainConfig:
        """The :class:`TrainConfig` of one surrogate's loop (``seed`` overrides the attack's)."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule="multistep" if self.lr_step else "constant",
            milestones=[self.lr_step] if self.lr_step else [],
            seed=self.seed if seed is None else seed,
            device=str(device),
            max_steps=self.max_steps,
        )


@dataclass
class TransferSet:
    """The images the attacker paid for and the victim's answers as targets."""

    images: torch.Tensor  # uint8 [n, C, H, W]
    targets: torch.Tensor  # float32 [n, classes]
    hard_labels: bool

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class ClassifierStealingResult:
    """What :meth:`ClassifierAttack.steal` returns: the members (one for a single surrogate), whose
    mean probability is the stolen model, the method's deterministic network, the training history
    and the monitor's rows (prediction variance and agreement over iterations)."""

    members: list[Classifier]
    single: Classifier  # the deterministic network: the only one of a single surrogate, the UQ mean
    history: list[dict[str, Any]]
    samples: int
    queries: int
    query_seconds: float
    train_seconds: float
    monitor: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class ClassifierAttack(Attack):
    """Base of the ``classifier`` family: the transfer set, the surrogate, the training loop."""

    family: ClassVar[str] = "classifier"
    Params: ClassVar[type[ClassifierAttackParams]] = ClassifierAttackParams
    params: ClassifierAttackParams

    def choose_samples(self, pool: ImageData, budget: int) -> ImageData:
        """The transfer set's images: ``min(budget, pool)`` of them, at random or balanced over the
        pool's labels (round-robin over classes, each class in a seeded random order)."""
        n = min(budget, len(pool))
        if n < 2:
            raise ValueError(f"{self.name}: a budget of {budget} buys {n} queries; at least 2 are needed")
        generator = torch.Generator().manual_seed(self.params.seed)
        order = torch.randperm(len(pool), generator=generator)
        if self.params.sampling == "class_balanced":
            by_class = [order[pool.labels[order] == c] for c in pool.labels.unique().tolist()]
            rank = torch.empty(len(pool), dtype=torch.int64)
            for members in by_class:
                rank[members] = torch.arange(len(members))
            class_of = pool.labels
            keys = rank * (int(class_of.max()) + 1) + class_of  # round-robin: rank first, class next
            order = torch.argsort(keys, stable=True)
        return pool.subset(order[:n])

    def query(self, oracle: ClassifierOracle, samples: ImageData) -> TransferSet:
        """Ask the victim once per sample."""
        targets = np.asarray(oracle.ask(samples.images.numpy()), dtype=np.float32)
        if targets.shape != (len(samples), oracle.num_classes):
            raise ValueError(f"the oracle returned {targets.shape} for {len(samples)} images")
        return TransferSet(samples.images, torch.from_numpy(targets.copy()), oracle.hard_labels)

    def build_surrogate(self, channels: int, num_classes: int, seed: int | None = None) -> Classifier:
        """A fresh surrogate classifier (seeded init; ``seed`` defaults to the attack's)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed if seed is None else seed)
            model = build_model(
                "classifier",
                self.params.architecture,
                channels,
                [SURROGATE_MEAN] * channels,
                [SURROGATE_STD] * channels,
                num_classes=num_classes,
                feature_dim=self.params.feature_dim,
            )
        assert isinstance(model, Classifier)
        return model

    def surrogate_for(self, data: TransferSet, seed: int | None = None) -> Classifier:
        """A fresh surrogate shaped for ``data``: its images' channels, its targets' classes."""
        return self.build_surrogate(int(data.images.shape[1]), int(data.targets.shape[1]), seed)

    def fit(
        self,
        model: Classifier,
        data: TransferSet,
        device: torch.device,
        *,
        seed: int | None = None,
        logits_fn: Callable[[Classifier, torch.Tensor], torch.Tensor] | None = None,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        params: list[Any] | None = None,
        on_epoch_end: EpochHook | None = None,
        on_step: Callable[[int], None] | None = None,
        progress: bool | None = None,
        description: str | None = None,
    ) -> list[dict[str, float]]:
        """Train ``model`` on the transfer set with :func:`distillation_loss`.

        ``logits_fn(model, x)`` replaces ``model(x)`` (MC dropout, Bayes-by-backprop),
        ``extra_loss()`` is added to every step's loss (a KL term), ``params`` are what the optimiser
        updates (default: the model's).
        """
        p = self.params
        move_to(model, device)
        targets = data.targets.to(device)

        def step(net: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x = batch_to_device(data.images[batch], device)
            with autocast(device):
                logits = logits_fn(model, x) if logits_fn is not None else net(x)
            loss = distillation_loss(logits, targets[batch.to(device)], p.temperature, data.hard_labels)
            return loss + extra_loss() if extra_loss is not None else loss

        return run_steps(
            model,
            len(data),
            step,
            p.train_config(device, seed),
            params=params,
            description=description or self.name,
            on_epoch_end=on_epoch_end,
            on_step=on_step,
            progress=progress,
        )

    @abc.abstractmethod
    def steal(
        self,
        oracle: ClassifierOracle,
        pool: ImageData,
        budget: int,
        device: torch.device,
        progress: bool | None = None,
        monitor: Monitor | None = None,
    ) -> ClassifierStealingResult:
        """Spend at most ``budget`` queries on images of ``pool``; train the surrogate(s).

        ``monitor``: held-out uint8 images (no queries spent on them) and, when known, the victim's
        labels of them, on which the members' predictions are logged during training (prediction
        variance over iterations; :class:`~attacker_client.uq.base.Monitor`).
        """

"""Robust Representation Matching (Vaishnavi, Eykholt & Rahmati, "Transferring Adversarial
Robustness Through Robust Representation Matching", USENIX Security 2022): steal an adversarially
trained victim's robustness through its embedding endpoint.

The attacker holds labelled images (its pool) and asks the victim for their representations once
(one query per image). It then trains a student of another architecture, whose penultimate width is
the victim's embedding width, on

    L = λ · CE(f_s(x), y) + w · (-cos(φ_s(x), φ_t(x)))      (or w · ||φ_s - φ_t|| / ||φ_t||, ``l2``)

with the released code's defaults λ = 0.005 and w = 1, clean inputs only: no adversarial examples
are made while training, which is where the speed comes from. The reference is PGD adversarial
training (Madry et al. 2018) of the same student on the same images and labels for the same epochs
(:func:`common.adversarial.train_adversarial`), and a plain student (cross-entropy only) shows what
the victim's representation added. Training defaults follow the released code's SGD with a cosine
schedule (lr 0.1, momentum 0.9, weight decay 5e-4); the quick profile's epochs are few.

RRM is the attack of the ``robustness`` family (:mod:`attacker_client.steal_robustness`): it steals an
encoder's robustness into a classifier; registered as ``rrm`` like every other attack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from attacker_client.attacks.base import EmbedOracle
from attacker_client.attacks.contract import ATTACKS, SURROGATE_MEAN, SURROGATE_STD, Attack, AttackParams
from common.adversarial import train_adversarial
from common.datasets import ImageData
from common.devices import autocast
from common.models import BACKBONES, Classifier, build_model
from common.training import TrainConfig, batch_to_device, run_steps, train_classifier


class RRMParams(AttackParams):
    """The student, its training, the RRM weights and the PGD-AT reference's attack."""

    architecture: str = Field("small_resnet", description="the student's backbone (another architecture)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.1, gt=0, description="SGD, cosine schedule")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lam: float = Field(0.005, ge=0, description="λ: weight of the cross-entropy")
    w: float = Field(1.0, ge=0, description="weight of the representation term")
    distance: Literal["cosine", "l2"] = Field("cosine", description="-cos, or relative L2 distance")
    at_eps: float = Field(0.1, gt=0, description="PGD-AT reference: L-inf radius on [0, 1]")
    at_step_size: float = Field(0.025, gt=0)
    at_steps: int = Field(5, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (smoke runs)")

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BACKBONES.names():
            raise ValueError(f"unknown student architecture {value!r}; known: {BACKBONES.names()}")
        return value

    def train_config(self, device: torch.device) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule="cosine",
            seed=self.seed,
            device=str(device),
            max_steps=self.max_steps,
        )


def rrm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    lam: float = 0.005,
    w: float = 1.0,
    distance: str = "cosine",
) -> torch.Tensor:
    """``λ·CE + w·d(φ_s, φ_t)``, ``d`` = mean negative cosine or mean relative L2 distance."""
    ce = F.cross_entropy(logits.float(), labels)
    s, t = student_features.float(), teacher_features.float()
    if distance == "cosine":
        d = -F.cosine_similarity(s, t, dim=1).mean()
    elif distance == "l2":
        d = ((s - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)).mean()
    else:
        raise ValueError(f"unknown distance {distance!r}")
    return lam * ce + w * d


@dataclass
class StudentRun:
    """A trained student and its training time."""

    model: Classifier
    seconds: float


@ATTACKS.register
class RobustRepresentationMatching(Attack):
    """Query the victim's representations once, then match them (see the module docstring)."""

    name = "rrm"
    paper = "Vaishnavi et al., Robust Representation Matching, USENIX Security 2022"
    family: ClassVar[str] = "robustness"
    Params = RRMParams
    params: RRMParams

    def choose_samples(self, pool: ImageData, budget: int) -> ImageData:
        """``min(budget, pool)`` labelled images, a seeded random choice."""
        n = min(budget, len(pool))
        if n < 2:
            raise ValueError(f"rrm: a budget of {budget} buys {n} queries; at least 2 are needed")
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.params.seed))
        return pool.subset(order[:n])

    def student(self, data: ImageData, feature_dim: int) -> Classifier:
        """A fresh student whose penultimate width is ``feature_dim`` (seeded init)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            model = build_model(
                "classifier",
                self.params.architecture,
                data.channels,
                [SURROGATE_MEAN] * data.channels,
                [SURROGATE_STD] * data.channels,
                num_classes=len(data.classes),
                feature_dim=feature_dim,
            )
        assert isinstance(model, Classifier)
        return model

    def match(
        self, data: ImageData, teacher: torch.Tensor, device: torch.device, progress: bool | None = None
    ) -> StudentRun:
        """Train the RRM student on ``data`` and the teacher's representations ``[N, d]``."""
        p = self.params
        model = self.student(data, teacher.shape[1]).to(device)
        labels, targets = data.labels.to(device), teacher.to(device)
        started = time.perf_counter()

        def step(net: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x = batch_to_device(data.images[batch], device)
            index = batch.to(device)
            with autocast(device):
                features = model.features(x)
                logits = model.head(features)
            return rrm_loss(logits, labels[index], features, targets[index], p.lam, p.w, p.distance)

        run_steps(
            model, len(data), step, p.train_config(device), description="RRM student", progress=progress
        )
        return StudentRun(model.eval(), time.perf_counter() - started)

    def steal(
        self,
        oracle: EmbedOracle,
        pool: ImageData,
        budget: int,
        device: torch.device,
        progress: bool | None = None,
    ) -> tuple[StudentRun, ImageData, float]:
        """Query the representations of the chosen samples once and train the RRM student;
        returns (the student, the samples, seconds spent querying)."""
        samples = self.choose_samples(pool, budget)
        started = time.perf_counter()
        teacher = torch.from_numpy(np.asarray(oracle(samples.images.numpy()), dtype=np.float32).copy())
        if teacher.shape[0] != len(samples) or teacher.ndim != 2:
            raise ValueError(f"the oracle returned {tuple(teacher.shape)} for {len(samples)} images")
        query_seconds = time.perf_counter() - started
        return self.match(samples, teacher, device, progress), samples, query_seconds

    def adversarial_reference(
        self, data: ImageData, feature_dim: int, device: torch.device, progress: bool | None = None
    ) -> StudentRun:
        """PGD adversarial training of the same student on the same labelled images."""
        p = self.params
        model = self.student(data, feature_dim)
        started = time.perf_counter()
        train_adversarial(model, data, p.train_config(device), p.at_eps, p.at_step_size, p.at_steps, progress)
        return StudentRun(model.eval(), time.perf_counter() - started)

    def plain_reference(
        self, data: ImageData, feature_dim: int, device: torch.device, progress: bool | None = None
    ) -> StudentRun:
        """The same student trained with cross-entropy only."""
        model = self.student(data, feature_dim)
        started = time.perf_counter()
        train_classifier(model, data, self.params.train_config(device), progress=progress)
        return StudentRun(model.eval(), time.perf_counter() - started)

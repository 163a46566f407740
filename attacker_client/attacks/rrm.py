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

Teacher features on augmented views (``augment=true``, ``views=V``): the released code
(``l_inf/train_rrm.py``, Ethos-lab/robust-representation-matching) recomputes the teacher's
representation on every augmented training batch (its CIFAR train transform: ``RandomCrop(32,
padding=4)`` + ``RandomHorizontalFlip()``). A thief pays a query for every image it shows the
teacher, so here each chosen sample is asked about in ``V`` augmented copies (:func:`crop_flip`: a
random crop of the zero-padded image back to its size, then a horizontal flip with probability 1/2;
default ``padding`` 2: Fashion-MNIST items fill most of the 28-pixel frame, and the released 4 of
32 pixels would cut off more of them), every copy one query: ``budget // V`` samples (over HTTP
two views that happen to be cut alike, 1 in 50 pairs at padding 2, are sent and charged once, by
the client's cache). The student
trains epoch ``e`` on view ``e mod V``, so consecutive epochs see the teacher's features of fresh
augmentations, as the released code's per-batch recomputation gives it (with ``V`` at least the
epochs, every epoch a fresh one). The PGD-AT and plain references then train on the same views on
the same schedule (they need no queries). The default (``views=1``, no augmentation) asks about the
clean images once.

RRM is the attack of the ``robustness`` family (:mod:`attacker_client.steal_robustness`): it steals an
encoder's robustness into a classifier; registered as ``rrm`` like every other attack.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from attacker_client.attacks.base import EmbedOracle
from attacker_client.attacks.contract import ATTACKS, SURROGATE_MEAN, SURROGATE_STD, Attack, AttackParams
from common.adversarial import pgd, train_adversarial
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
    augment: bool = Field(
        False, description="ask the teacher about augmented views (random crop + flip), not clean images"
    )
    views: int = Field(
        1,
        ge=1,
        le=64,
        description="augmented views of each sample, one query each (epoch e: view e mod views)",
    )
    padding: int = Field(2, ge=0, le=16, description="zero padding of the random crop, pixels per side")

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BACKBONES.names():
            raise ValueError(f"unknown student architecture {value!r}; known: {BACKBONES.names()}")
        return value

    @model_validator(mode="after")
    def _views_need_augmentation(self) -> Self:
        if self.views > 1 and not self.augment:
            raise ValueError(
                f"views={self.views} needs augment=true: clean copies of an image are the same query, "
                "answered the same"
            )
        return self

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


def crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One augmented view of every image of ``images`` ``[N, C, H, W]`` (any dtype; uint8 stays
    exact): torchvision's ``RandomCrop(size, padding)`` then ``RandomHorizontalFlip()``, the
    released RRM code's train transform. Each image is zero-padded by ``padding`` pixels per side,
    an ``H x W`` window at a uniformly random offset in ``[0, 2 * padding]`` (rows and columns
    independently) is cut out, and with probability 1/2 it is mirrored left-right. Batched (one
    gather, no per-image loop); the offsets and flips come from ``generator``, so a seeded
    generator gives the same views again."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = top[:, None] + torch.arange(h)  # [N, H]: the window's rows in the padded image
    cols = left[:, None] + torch.arange(w)  # [N, W]: its columns, reversed for a flipped image
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    samples, channels = torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None]
    index = (samples, channels, rows[:, None, :, None], cols[:, None, None, :])
    return padded[tuple(i.to(images.device) for i in index)]


# Offset of the views' generator from the attack's seed (the sample choice uses the seed itself).
VIEW_SEED = 7919

LossStep = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int, torch.Generator], torch.Tensor]
"""``loss(net, x, index, view, generator)``: a student's loss on the images ``x``, view ``view`` of
the samples ``index``."""


@dataclass
class StudentRun:
    """A trained student, its training time and its per-epoch history (with the view each epoch
    trained on, when it trained on views)."""

    model: Classifier
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


@ATTACKS.register
class RobustRepresentationMatching(Attack):
    """Query the victim's representations once, then match them (see the module docstring)."""

    name = "rrm"
    paper = "Vaishnavi et al., Robust Representation Matching, USENIX Security 2022"
    family: ClassVar[str] = "robustness"
    Params = RRMParams
    params: RRMParams

    def queries_per_sample(self) -> int:
        """Each chosen sample is asked about in ``views`` views (1: the clean image)."""
        return self.params.views

    def choose_samples(self, pool: ImageData, budget: int) -> ImageData:
        """``min(budget // views, pool)`` labelled images, a seeded random choice."""
        n = min(budget // self.params.views, len(pool))
        if n < 2:
            raise ValueError(
                f"rrm: a budget of {budget} queries buys {n} samples at {self.params.views} "
                "queries each; at least 2 are needed"
            )
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.params.seed))
        return pool.subset(order[:n])

    def view_images(self, data: ImageData) -> torch.Tensor:
        """The images ``[V, N, C, H, W]`` (uint8) the teacher is asked about and the students train
        on: the clean images (``V = 1``) or ``views`` :func:`crop_flip` views of each, drawn from a
        generator seeded by the attack's seed (the same samples always get the same views)."""
        p = self.params
        if not p.augment:
            return data.images.unsqueeze(0)
        generator = torch.Generator().manual_seed(p.seed + VIEW_SEED)
        return torch.stack([crop_flip(data.images, p.padding, generator) for _ in range(p.views)])

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

    def fit_views(
        self,
        model: Classifier,
        views: torch.Tensor,
        loss: LossStep,
        device: torch.device,
        description: str,
        progress: bool | None = None,
    ) -> StudentRun:
        """Train ``model`` with ``loss`` on ``views`` ``[V, N, C, H, W]``: epoch ``e`` draws its
        batches from view ``e mod V`` (the history records it as ``view``)."""
        model.to(device)
        current = [0]

        def step(net: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x = batch_to_device(views[current[0]][batch], device)
            return loss(net, x, batch.to(device), current[0], generator)

        def next_view(epoch: int) -> dict[str, float]:
            current[0] = (epoch + 1) % len(views)
            return {"view": float(epoch % len(views))}

        started = time.perf_counter()
        history = run_steps(
            model,
            views.shape[1],
            step,
            self.params.train_config(device),
            description=description,
            on_epoch_end=next_view,
            progress=progress,
        )
        return StudentRun(model.eval(), time.perf_counter() - started, history)

    def match(
        self,
        data: ImageData,
        teacher: torch.Tensor,
        device: torch.device,
        progress: bool | None = None,
        views: torch.Tensor | None = None,
    ) -> StudentRun:
        """Train the RRM student on ``data``'s labels and the teacher's representations: ``[N, d]``
        of the clean images, or ``[V, N, d]`` of ``views`` ``[V, N, C, H, W]`` (epoch ``e`` on view
        ``e mod V``)."""
        p = self.params
        targets = teacher.unsqueeze(0) if teacher.ndim == 2 else teacher
        images = data.images.unsqueeze(0) if views is None else views
        if targets.ndim != 3 or tuple(targets.shape[:2]) != (len(images), len(data)):
            raise ValueError(
                f"teacher representations {tuple(teacher.shape)} do not fit {len(images)} views of "
                f"{len(data)} images"
            )
        if tuple(images.shape[1:]) != tuple(data.images.shape):
            raise ValueError(
                f"views {tuple(images.shape)} are not views of the images {tuple(data.images.shape)}"
            )
        model = self.student(data, targets.shape[2])
        labels, targets = data.labels.to(device), targets.to(device)

        def loss(
            net: torch.nn.Module, x: torch.Tensor, index: torch.Tensor, view: int, _: torch.Generator
        ) -> torch.Tensor:
            with autocast(device):
                features = model.features(x)
                logits = model.head(features)
            return rrm_loss(logits, labels[index], features, targets[view][index], p.lam, p.w, p.distance)

        return self.fit_views(model, images, loss, device, "RRM student", progress)

    def steal(
        self,
        oracle: EmbedOracle,
        pool: ImageData,
        budget: int,
        device: torch.device,
        progress: bool | None = None,
    ) -> tuple[StudentRun, ImageData, float]:
        """Query the representations of the chosen samples' views (``views`` queries a sample,
        never more than ``budget``) and train the RRM student; returns (the student, the samples,
        seconds spent querying)."""
        samples = self.choose_samples(pool, budget)
        views = self.view_images(samples)
        started = time.perf_counter()
        flat = views.flatten(0, 1).numpy()
        answer = torch.from_numpy(np.asarray(oracle(flat), dtype=np.float32).copy())
        if answer.ndim != 2 or answer.shape[0] != len(flat):
            raise ValueError(f"the oracle returned {tuple(answer.shape)} for {len(flat)} images")
        query_seconds = time.perf_counter() - started
        teacher = answer.view(len(views), len(samples), answer.shape[1])
        return self.match(samples, teacher, device, progress, views), samples, query_seconds

    def adversarial_reference(
        self, data: ImageData, feature_dim: int, device: torch.device, progress: bool | None = None
    ) -> StudentRun:
        """PGD adversarial training of the same student on the same labelled images (on the same
        views, epoch ``e`` on view ``e mod V``, when the attack augments)."""
        p = self.params
        model = self.student(data, feature_dim)
        if not p.augment:
            started = time.perf_counter()
            train_adversarial(
                model, data, p.train_config(device), p.at_eps, p.at_step_size, p.at_steps, progress
            )
            return StudentRun(model.eval(), time.perf_counter() - started)
        labels = data.labels.to(device)

        def loss(
            net: torch.nn.Module, x: torch.Tensor, index: torch.Tensor, _: int, g: torch.Generator
        ) -> torch.Tensor:
            y = labels[index]
            model.eval()  # as train_adversarial: BatchNorm statistics from the examples trained on
            adversarial = pgd(
                net, x, y, eps=p.at_eps, step_size=p.at_step_size, steps=p.at_steps, generator=g
            )
            model.train()
            with autocast(device):
                return F.cross_entropy(net(adversarial), y)

        return self.fit_views(
            model, self.view_images(data), loss, device, "PGD adversarial training", progress
        )

    def plain_reference(
        self, data: ImageData, feature_dim: int, device: torch.device, progress: bool | None = None
    ) -> StudentRun:
        """The same student trained with cross-entropy only (on the same views when the attack
        augments)."""
        model = self.student(data, feature_dim)
        if not self.params.augment:
            started = time.perf_counter()
            train_classifier(model, data, self.params.train_config(device), progress=progress)
            return StudentRun(model.eval(), time.perf_counter() - started)
        labels = data.labels.to(device)

        def loss(
            net: torch.nn.Module, x: torch.Tensor, index: torch.Tensor, _: int, __: torch.Generator
        ) -> torch.Tensor:
            with autocast(device):
                return F.cross_entropy(net(x), labels[index])

        return self.fit_views(model, self.view_images(data), loss, device, "plain student", progress)

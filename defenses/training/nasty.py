"""Nasty Teacher (Ma et al., "Undistillable: Making A Nasty Teacher That CANNOT Teach Students",
ICLR 2021): a teacher trained to keep its accuracy while its softened outputs move as far as
possible from a normal network's, so that a student distilling them learns less.

``L = CE(f(x), y) - ω·τ²·KL(softmax(f_a(x) / τ) || softmax(f(x) / τ))`` with ``f_a`` the frozen
baseline (the paper's "adversarial network"); defaults ω = 0.04 and τ = 4 (the paper's CIFAR-10
setting). Trained from scratch on the baseline's private data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from common.datasets import ImageData
from common.devices import autocast
from common.models import Classifier
from common.training import TrainConfig, batch_to_device, run_steps
from defenses.training.base import TEACHER_DEFENSES, TeacherDefense, TeacherDefenseParams


class NastyParams(TeacherDefenseParams):
    """The paper's CIFAR-10 weights."""

    omega: float = Field(0.04, ge=0, description="weight of the (negated) KL term")
    temperature: float = Field(4.0, gt=0, description="τ of both softmaxes")


def nasty_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    baseline_logits: torch.Tensor,
    omega: float,
    temperature: float,
) -> torch.Tensor:
    """The Nasty Teacher objective of the module docstring."""
    log_q = F.log_softmax(logits.float() / temperature, dim=1)
    p = torch.softmax(baseline_logits.detach().float() / temperature, dim=1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1).mean()
    return F.cross_entropy(logits.float(), labels) - omega * temperature**2 * kl


@TEACHER_DEFENSES.register
class NastyTeacher(TeacherDefense):
    """Accurate labels, softened outputs pushed away from a normal network's."""

    name = "nasty"
    paper = "Ma et al., Undistillable: Making A Nasty Teacher That CANNOT Teach Students, ICLR 2021"
    Params = NastyParams
    params: NastyParams

    def train(
        self,
        baseline: Classifier,
        fresh: Classifier,
        data: ImageData,
        cfg: TrainConfig,
        progress: bool | None,
    ) -> Classifier:
        p = self.params
        device = torch.device(cfg.device) if cfg.device != "auto" else next(baseline.parameters()).device
        baseline.eval().to(device)
        fresh.to(device)
        labels = data.labels.to(device)

        def step(net: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x = batch_to_device(data.images[batch], device)
            with torch.no_grad(), autocast(device):
                reference = baseline(x)
            with autocast(device):
                logits = net(x)
            return nasty_loss(logits, labels[batch.to(device)], reference, p.omega, p.temperature)

        run_steps(fresh, len(data), step, cfg, description="Nasty teacher", progress=progress)
        return fresh

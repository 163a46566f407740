"""Nasty Teacher (Ma et al., "Undistillable: Making A Nasty Teacher That CANNOT Teach Students",
ICLR 2021): a teacher trained to keep its accuracy while its softened outputs move as far as
possible from a normal network's, so that a student distilling them learns less.

``L = CE(f(x), y) - ω·τ²·KL(softmax(f(x) / τ) || softmax(f_a(x) / τ))`` with ``f`` the teacher being
trained and ``f_a`` the frozen baseline (the paper's "adversarial network"). The direction is the
released code's (``train_nasty.py`` in VITA-Group/Nasty-Teacher):
``nn.KLDivLoss(reduction='batchmean')(F.log_softmax(output_stu / T), F.softmax(output_tch / T)) * T * T``
with ``output_stu`` the adversarial (baseline) network's logits and ``output_tch`` the teacher's;
torch's ``KLDivLoss(input=log q, target=p)`` is ``KL(p || q)``, so the teacher maximises
KL(teacher || baseline), the order in which the paper writes the term too. The released loss adds
the constant 100 "to make the loss positive", which changes no gradient and is left out here.
``kl_direction="baseline_teacher"`` maximises KL(baseline || teacher) instead (this project's
earlier form: it weights the classes by the baseline's probabilities rather than the teacher's).

Defaults ω = 0.04 and τ = 4 (the released CIFAR-10 ``params.json``: ``weight`` 0.04,
``temperature`` 4). Trained from scratch on the baseline's private data.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from common.datasets import ImageData
from common.devices import autocast
from common.models import Classifier
from common.training import TrainConfig, batch_to_device, run_steps
from defenses.training.base import TEACHER_DEFENSES, TeacherDefense, TeacherDefenseParams


class NastyParams(TeacherDefenseParams):
    """The released CIFAR-10 weights and KL direction."""

    omega: float = Field(0.04, ge=0, description="weight of the (negated) KL term")
    temperature: float = Field(4.0, gt=0, description="τ of both softmaxes")
    kl_direction: Literal["teacher_baseline", "baseline_teacher"] = Field(
        "teacher_baseline",
        description="KL(teacher || baseline) as released, or KL(baseline || teacher)",
    )


def nasty_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    baseline_logits: torch.Tensor,
    omega: float,
    temperature: float,
    kl_direction: str = "teacher_baseline",
) -> torch.Tensor:
    """The Nasty Teacher objective of the module docstring; the KL is summed over classes and
    averaged over the batch (``reduction='batchmean'``)."""
    log_teacher = F.log_softmax(logits.float() / temperature, dim=1)
    log_baseline = F.log_softmax(baseline_logits.detach().float() / temperature, dim=1)
    if kl_direction == "teacher_baseline":
        kl = (log_teacher.exp() * (log_teacher - log_baseline)).sum(dim=1).mean()
    elif kl_direction == "baseline_teacher":
        kl = (log_baseline.exp() * (log_baseline - log_teacher)).sum(dim=1).mean()
    else:
        raise ValueError(f"kl_direction must be teacher_baseline or baseline_teacher, not {kl_direction!r}")
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
            return nasty_loss(
                logits, labels[batch.to(device)], reference, p.omega, p.temperature, p.kl_direction
            )

        run_steps(fresh, len(data), step, cfg, description="Nasty teacher", progress=progress)
        return fresh

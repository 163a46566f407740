"""Adversarial Sparse Teacher (Yilmaz & Keles, arXiv 2403.05181): a teacher whose soft outputs
mislead knowledge-distillation stealing while its labels stay right.

1. The baseline teacher (the plain victim) crafts PGD adversarial examples of the training set
   (untargeted, cross-entropy, L-inf; released defaults eps 0.3, step 0.01, 40 steps on [0, 1]).
2. The AST teacher trains from scratch: for a clean batch (x, y) and its adversarial batch x_adv,
   ``z_adv = f(x_adv)`` without gradient and in eval mode, keep its top-k logits (k = 2 for 10
   classes), set the rest to -inf; ``p = softmax(f(x) / T)``, ``q = softmax(z_sparse / T)``;
   ``L = α·T²·D(p, q) + (1 - α)·CE(f(x), y)`` with α = 0.05 and T = 6 (the paper's CIFAR-10 values).
3. ``D`` is ``kl``: KL(q || p), or ``epd``: the released code's "exponential predictive divergence",
   PyTorch's ``KLDivLoss(log_target=True)`` applied to probabilities, ``Σ_c e^{q_c} (q_c - p_c)``
   (batch mean).

The quick profile (``stealrange train-victim --defense ast``) uses 10 PGD steps of 0.03 (the same
eps, a quarter of the compute on 2 CPU cores); the paper's 40 x 0.01 is ``-d steps=40 -d step_size=0.01``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from common.adversarial import pgd
from common.datasets import ImageData
from common.devices import autocast
from common.models import Classifier
from common.training import TrainConfig, batch_to_device, run_steps
from defenses.training.base import TEACHER_DEFENSES, TeacherDefense, TeacherDefenseParams

ADVERSARIAL_BATCH = 256


class ASTParams(TeacherDefenseParams):
    """The released defaults (CIFAR-10), PGD on [0, 1] inputs."""

    eps: float = Field(0.3, gt=0, description="PGD L-inf radius of the adversarial set")
    step_size: float = Field(0.01, gt=0, description="PGD step")
    steps: int = Field(40, ge=1, description="PGD steps")
    k: int = Field(2, ge=1, description="adversarial logits kept (the rest -inf)")
    alpha: float = Field(0.05, ge=0, le=1, description="weight of the divergence term")
    temperature: float = Field(6.0, gt=0, description="T of both softmaxes")
    divergence: Literal["kl", "epd"] = Field("kl", description="KL(q || p) or the released code's EPD")


def sparse_targets(adversarial_logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """``softmax(z_sparse / T)``: the top-k logits kept, the rest -inf (probability 0)."""
    top = adversarial_logits.topk(min(k, adversarial_logits.shape[1]), dim=1).indices
    sparse = torch.full_like(adversarial_logits, float("-inf")).scatter(
        1, top, adversarial_logits.gather(1, top)
    )
    return torch.softmax(sparse / temperature, dim=1)


def ast_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    adversarial_logits: torch.Tensor,
    k: int = 2,
    alpha: float = 0.05,
    temperature: float = 6.0,
    divergence: str = "kl",
) -> torch.Tensor:
    """The AST objective of the module docstring (``adversarial_logits`` carry no gradient)."""
    q = sparse_targets(adversarial_logits.detach().float(), k, temperature)
    if divergence == "kl":
        log_p = F.log_softmax(logits.float() / temperature, dim=1)
        d = (torch.xlogy(q, q) - q * log_p).sum(dim=1).mean()
    elif divergence == "epd":
        p = torch.softmax(logits.float() / temperature, dim=1)
        d = (q.exp() * (q - p)).sum(dim=1).mean()
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return alpha * temperature**2 * d + (1 - alpha) * F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def adversarial_set(
    baseline: Classifier, data: ImageData, eps: float, step_size: float, steps: int, device: torch.device
) -> torch.Tensor:
    """PGD examples of every image of ``data`` against the baseline (float32 [N, C, H, W] in [0, 1])."""
    baseline.eval().to(device)
    out = []
    for start in range(0, len(data), ADVERSARIAL_BATCH):
        x = data.images[start : start + ADVERSARIAL_BATCH].to(device).float() / 255.0
        y = data.labels[start : start + ADVERSARIAL_BATCH].to(device)
        out.append(pgd(baseline, x, y, eps=eps, step_size=step_size, steps=steps, random_init=False).cpu())
    return torch.cat(out)


@TEACHER_DEFENSES.register
class AdversarialSparseTeacher(TeacherDefense):
    """A teacher trained towards the baseline's sparse adversarial logits."""

    name = "ast"
    paper = "Yilmaz & Keles, Adversarial Sparse Teacher, arXiv 2403.05181"
    Params = ASTParams
    params: ASTParams

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
        adversarial = adversarial_set(baseline, data, p.eps, p.step_size, p.steps, device)
        fresh.to(device)
        labels = data.labels.to(device)

        def step(net: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x = batch_to_device(data.images[batch], device)
            # The released code takes the adversarial logits in eval mode: batch norm's running
            # statistics, neither taken from nor updated by the adversarial batch.
            net.eval()
            with torch.no_grad(), autocast(device):
                z_adv = net(adversarial[batch].to(device))
            net.train()
            with autocast(device):
                logits = net(x)
            return ast_loss(
                logits, labels[batch.to(device)], z_adv, p.k, p.alpha, p.temperature, p.divergence
            )

        run_steps(fresh, len(data), step, cfg, description="AST teacher", progress=progress)
        return fresh

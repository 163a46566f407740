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
4. ``pairing``: which adversarial example a clean image is trained towards. ``own`` (the paper's
   text, the default): each image's own adversarial example. ``shuffled`` (the released
   ``train_adv_teacher.py``): it zips a shuffled clean loader with an unshuffled loader of the
   adversarial set, so the i-th clean image of an epoch gets the sparse targets of the i-th
   adversarial example in the set's order, another image's almost always
   (:func:`adversarial_positions`).

The quick profile (``stealrange train-victim --defense ast``) uses 10 PGD steps of 0.03 (the same
eps, a quarter of the compute on 2 CPU cores); the paper's 40 x 0.01 is ``-d steps=40 -d step_size=0.01``.
"""

from __future__ import annotations

import hashlib
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
    pairing: Literal["own", "shuffled"] = Field(
        "own",
        description="each image's own adversarial example (the paper) or the released code's "
        "shuffled-clean x sequential-adversarial zip",
    )


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


def adversarial_positions(batch: torch.Tensor, pairing: str, cursor: int, n: int) -> tuple[torch.Tensor, int]:
    """Indices into the adversarial set for the clean ``batch`` (indices into the training set),
    and the next cursor. ``own``: the batch itself. ``shuffled``: the released code's zip of a
    shuffled clean loader with an unshuffled adversarial one: the next ``len(batch)`` positions of
    the set in order from ``cursor``, which returns to 0 when an epoch's batches have used all ``n``
    (the released loaders keep their last, smaller batch)."""
    if pairing == "own":
        return batch, cursor
    if pairing != "shuffled":
        raise ValueError(f"unknown pairing {pairing!r}")
    positions = torch.arange(cursor, cursor + len(batch)) % n
    cursor += len(batch)
    return positions, 0 if cursor >= n else cursor


# Adversarial sets already made in this process, by (baseline, data, PGD settings) digest: the
# AST teachers of one baseline that differ only in their loss (KL / EPD, pairing) share theirs.
_ADVERSARIAL_SETS: dict[str, torch.Tensor] = {}
_KEEP_SETS = 2


def _digest(baseline: Classifier, data: ImageData, *settings: object) -> str:
    h = hashlib.sha256(repr(settings).encode())
    for tensor in (*baseline.state_dict().values(), data.images, data.labels):
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def adversarial_set(
    baseline: Classifier, data: ImageData, eps: float, step_size: float, steps: int, device: torch.device
) -> torch.Tensor:
    """PGD examples of every image of ``data`` against the baseline (float32 [N, C, H, W] in [0, 1]);
    made once per process for the same baseline weights, data and PGD settings."""
    key = _digest(baseline, data, eps, step_size, steps)
    if key in _ADVERSARIAL_SETS:
        return _ADVERSARIAL_SETS[key]
    baseline.eval().to(device)
    out = []
    for start in range(0, len(data), ADVERSARIAL_BATCH):
        x = data.images[start : start + ADVERSARIAL_BATCH].to(device).float() / 255.0
        y = data.labels[start : start + ADVERSARIAL_BATCH].to(device)
        out.append(pgd(baseline, x, y, eps=eps, step_size=step_size, steps=steps, random_init=False).cpu())
    while len(_ADVERSARIAL_SETS) >= _KEEP_SETS:
        _ADVERSARIAL_SETS.pop(next(iter(_ADVERSARIAL_SETS)))
    _ADVERSARIAL_SETS[key] = torch.cat(out)
    return _ADVERSARIAL_SETS[key]


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
        cursor = 0

        def step(net: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            nonlocal cursor
            x = batch_to_device(data.images[batch], device)
            paired, cursor = adversarial_positions(batch, p.pairing, cursor, len(data))
            # The released code takes the adversarial logits in eval mode: batch norm's running
            # statistics, neither taken from nor updated by the adversarial batch.
            net.eval()
            with torch.no_grad(), autocast(device):
                z_adv = net(adversarial[paired].to(device))
            net.train()
            with autocast(device):
                logits = net(x)
            return ast_loss(
                logits, labels[batch.to(device)], z_adv, p.k, p.alpha, p.temperature, p.divergence
            )

        run_steps(fresh, len(data), step, cfg, description="AST teacher", progress=progress)
        return fresh

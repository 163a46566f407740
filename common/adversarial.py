"""Projected gradient descent (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018): the attack behind adversarial training, Adversarial Sparse Teacher's
adversarial set and the robustness evaluations of Robust Representation Matching.

Inputs are images in [0, 1] (the models here normalise inside). Each of ``steps`` iterations moves
``delta`` by ``step_size`` along the sign of the loss gradient (L-inf) or its L2-normalised direction
(L2), projects it back onto the ``eps`` ball, and keeps ``x + delta`` in [0, 1]. With
``random_start`` the first ``delta`` is uniform in the ball (L-inf) or a uniformly random direction
at a uniformly random radius (L2); with ``restarts > 1`` the attack runs again from fresh starts and
keeps, per image, the perturbation with the highest loss. ``targeted`` descends the loss to
``y`` instead of ascending it. Defaults are Madry et al.'s CIFAR-10 L-inf setting expressed on
[0, 1]: eps 8/255, step 2/255, 10 steps (their MNIST setting: eps 0.3, step 0.01, 40 steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.datasets import ImageData
from common.devices import autocast, resolve_device
from common.training import TrainConfig, batch_to_device, run_steps

Norm = Literal["linf", "l2"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """``delta`` projected onto the ``eps`` ball of ``norm`` (per sample)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)


def random_start(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the ``eps`` ball around each image (see the module docstring)."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (2 * noise - 1) * eps
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    radius = torch.rand(x.shape[0], generator=generator, dtype=x.dtype).to(x.device) * eps
    return direction / _per_sample_norm(direction) * radius.view(-1, *([1] * (x.dim() - 1)))


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    norm: Norm = "linf",
    random_init: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial examples ``x + delta`` with ``||delta|| <= eps`` in [0, 1] (module docstring).

    ``loss_fn(logits, y)`` defaults to per-sample cross-entropy (it must return one loss per image
    so that restarts can keep the best per image). The model's mode is left as it is: call it in
    ``eval()`` for evaluation, as adversarial training recipes do for BatchNorm.
    """
    if eps < 0 or step_size <= 0 or steps < 0 or restarts < 1:
        raise ValueError(
            f"invalid PGD settings eps={eps} step_size={step_size} steps={steps} restarts={restarts}"
        )
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction="none"))
    x = x.detach()
    best, best_loss = x.clone(), torch.full((x.shape[0],), -torch.inf, device=x.device)
    sign = -1.0 if targeted else 1.0
    for _ in range(restarts):
        delta = random_start(x, eps, norm, generator) if random_init else torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(model(x + delta), y).sum()
                (grad,) = torch.autograd.grad(sign * loss, delta)
            step = grad.sign() if norm == "linf" else grad / _per_sample_norm(grad)
            delta = project(delta.detach() + step_size * step, eps, norm)
            delta = ((x + delta).clamp(0, 1) - x).detach()
        with torch.no_grad():
            final = sign * loss_fn(model(x + delta), y)
            better = final > best_loss
            best[better] = (x + delta)[better]
            best_loss = torch.where(better, final, best_loss)
    return best.detach()


@torch.no_grad()
def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | None = None,
    **pgd_kwargs: object,
) -> float:
    """Accuracy of ``model`` (put in eval mode) on PGD examples of uint8 ``images`` (untargeted)."""
    model.eval()
    device = device or next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float() / 255.0
        y = labels[start : start + batch_size].to(device)
        adversarial = pgd(model, x, y, **pgd_kwargs)  # type: ignore[arg-type]
        correct += int((model(adversarial).argmax(dim=1) == y).sum())
    return correct / max(1, len(images))


def train_adversarial(
    model: nn.Module,
    data: ImageData,
    cfg: TrainConfig,
    eps: float,
    step_size: float,
    steps: int,
    progress: bool | None = None,
) -> list[dict[str, float]]:
    """PGD adversarial training (Madry et al., ICLR 2018): every step trains on PGD examples of the
    batch (L-inf, random start, the model in eval mode while attacking so BatchNorm statistics
    come from the examples it trains on)."""
    device = resolve_device(cfg.device)
    model.to(device)
    labels = data.labels.to(device)

    def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = batch_to_device(data.images[batch], device)
        y = labels[batch.to(device)]
        model.eval()
        adversarial = pgd(net, x, y, eps=eps, step_size=step_size, steps=steps, generator=generator)
        model.train()
        with autocast(device):
            return F.cross_entropy(net(adversarial), y)

    return run_steps(model, len(data), step, cfg, description="PGD adversarial training", progress=progress)

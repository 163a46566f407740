"""Self-Ensemble Protection (Chen et al., "Self-Ensemble Protection: Training Checkpoints Are Good
Data Protectors", ICLR 2023): perturb a dataset before release so that models trained on it fail on
clean data, using the checkpoints of ONE training run as an ensemble.

1. Train a protecting model on the data to protect, keeping ``n_checkpoints`` evenly spaced
   snapshots of the run (the paper: 30 for SEP and SEP-FA, 15 for SEP-FA-VR, of a 120-epoch run).
2. Push every image of class ``y`` towards the target class ``g(y) = (y + C/2) mod C`` ((y + 5) mod
   10) within an L-inf ball of radius ``eps``, by signed-gradient steps of size ``step_size``:
   ``x <- clip(x - step_size * sign(ḡ), x0 ± eps, [0, 1])`` for ``steps`` iterations, with ``ḡ`` the
   gradient averaged over the checkpoints of

   - ``sep``: the cross-entropy of the checkpoint's prediction to ``g(y)``;
   - ``sep-fa`` (feature alignment): the MSE between the checkpoint's penultimate features and the
     mean feature of class ``g(y)`` (per checkpoint, on the data to protect);
   - ``sep-fa-vr`` (variance reduction): the SEP-FA loss with an SVRG-style inner loop: each outer
     iteration computes every checkpoint's gradient at the current point and their mean, then
     ``inner_steps`` (16) updates each use one random checkpoint's gradient corrected by (its
     outer gradient - the mean); ``ceil(steps / inner_steps)`` outer iterations, so every method
     makes about ``steps`` updates.

Defaults: the paper's CIFAR-10 values (eps 2/255, step 1/255, 30 steps); the quick profile and the
issue's benchmark use eps 8/255. ``random_noise`` is the baseline of the same radius: uniform
noise in [-eps, eps], clipped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from common.datasets import ImageData
from common.models import Classifier
from common.progress import make_progress

Method = Literal["sep", "sep-fa", "sep-fa-vr"]
BATCH = 256


class SEPConfig(BaseModel):
    """How a dataset is protected (the paper's CIFAR-10 defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "sep"
    eps: float = Field(2 / 255, gt=0, le=1, description="L-inf radius of the perturbation")
    step_size: float = Field(1 / 255, gt=0, description="signed-gradient step")
    steps: int = Field(30, ge=1, description="updates per image")
    inner_steps: int = Field(16, ge=1, description="SEP-FA-VR: variance-reduced updates per outer step")
    seed: int = 0


def target_classes(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``g(y) = (y + C // 2) mod C``: (y + 5) mod 10 for 10 classes, (y + 50) mod 100 for 100."""
    return (labels + classes // 2) % classes


@torch.no_grad()
def class_mean_features(model: Classifier, data: ImageData, device: torch.device) -> torch.Tensor:
    """Mean penultimate feature of every class on ``data`` (``[C, d]``; zero for an absent class)."""
    model.eval().to(device)
    classes = model.num_classes
    sums = torch.zeros(classes, model.feature_dim, dtype=torch.float64)
    counts = torch.zeros(classes, dtype=torch.float64)
    for start in range(0, len(data), BATCH):
        x = data.images[start : start + BATCH].to(device).float() / 255
        features = model.features(x).double().cpu()
        labels = data.labels[start : start + BATCH]
        sums.index_add_(0, labels, features)
        counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
    return (sums / counts.clamp_min(1).unsqueeze(1)).float()


LossFn = Callable[[Classifier, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _gradient(
    model: Classifier, x: torch.Tensor, target: torch.Tensor, loss_fn: LossFn, k: int
) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model, x, target, k)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def protect_batch(
    x0: torch.Tensor,
    target: torch.Tensor,
    checkpoints: list[Classifier],
    config: SEPConfig,
    class_means: list[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The protected version of the batch ``x0`` (floats in [0, 1]) with targets ``g(y)``."""
    if config.method != "sep" and class_means is None:
        raise ValueError(f"{config.method} needs the class-mean features of every checkpoint")

    def loss_fn(model: Classifier, x: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
        if config.method == "sep":
            return F.cross_entropy(model(x), t, reduction="sum")
        assert class_means is not None
        return F.mse_loss(model.features(x), class_means[k].to(x.device)[t], reduction="sum")

    def update(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        x = x - config.step_size * grad.sign()
        return torch.min(torch.max(x, x0 - config.eps), x0 + config.eps).clamp(0, 1).detach()

    def mean_gradient(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grads = [_gradient(model, x, target, loss_fn, k) for k, model in enumerate(checkpoints)]
        return torch.stack(grads).mean(dim=0), grads

    x = x0.clone()
    if config.method != "sep-fa-vr":
        for _ in range(config.steps):
            x = update(x, mean_gradient(x)[0])
        return x
    for _ in range(math.ceil(config.steps / config.inner_steps)):
        mean, outer = mean_gradient(x)
        inner = x
        for _ in range(config.inner_steps):
            k = int(torch.randint(len(checkpoints), (1,), generator=generator))
            grad = _gradient(checkpoints[k], inner, target, loss_fn, k) - outer[k] + mean
            inner = update(inner, grad)
        x = inner
    return x


def protect(
    data: ImageData,
    checkpoints: list[Classifier],
    config: SEPConfig,
    device: torch.device,
    progress: bool | None = None,
) -> ImageData:
    """``data`` perturbed by ``config.method`` with the protecting run's ``checkpoints`` (uint8)."""
    for model in checkpoints:
        model.eval().to(device)
    classes = checkpoints[0].num_classes
    means = None if config.method == "sep" else [class_mean_features(m, data, device) for m in checkpoints]
    generator = torch.Generator().manual_seed(config.seed)
    out = torch.empty_like(data.images)
    with make_progress(progress) as bar:
        task = bar.add_task(f"{config.method} (eps {config.eps * 255:.1f}/255)", total=len(data), status="")
        for start in range(0, len(data), BATCH):
            x0 = data.images[start : start + BATCH].to(device).float() / 255
            target = target_classes(data.labels[start : start + BATCH], classes).to(device)
            x = protect_batch(x0, target, checkpoints, config, means, generator)
            out[start : start + BATCH] = quantize(x, x0, config.eps).cpu()
            bar.update(task, advance=len(x0))
    return ImageData(f"{data.name}-{config.method}", out, data.labels.clone(), data.classes)


def quantize(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """uint8 of ``x`` rounded towards ``x0`` so that the stored perturbation stays within ``eps``."""
    levels = x * 255
    clean = x0 * 255
    rounded = torch.where(levels > clean, torch.floor(levels + 1e-4), torch.ceil(levels - 1e-4))
    return rounded.clamp(0, 255).to(torch.uint8)


def random_noise(data: ImageData, eps: float, seed: int = 0) -> ImageData:
    """The baseline: uniform noise in [-eps, eps] per pixel, clipped to [0, 1] (uint8)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = data.images.float() / 255
    noise = (torch.rand(x0.shape, generator=generator) * 2 - 1) * eps
    x = (x0 + noise).clamp(0, 1)
    return ImageData(f"{data.name}-noise", quantize(x, x0, eps), data.labels.clone(), data.classes)

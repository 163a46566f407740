"""Training loops: one generic step loop, supervised cross-entropy, and SimCLR.

Every loop takes a :class:`TrainConfig`, runs on the device it names (CUDA with bfloat16 AMP and
channels_last when present; bit-reproducible on the CPU for a fixed seed), draws mini-batches from
a seeded generator and shows a progress bar. Attacks reuse :func:`run_steps` with their own losses.

Under ``torchrun`` (a process group initialised, see :mod:`common.distributed`) the same loop
trains data-parallel: each rank takes its shard of every epoch's permutation, calls the
DDP-wrapped ``net`` and DDP averages the gradients; the progress bar is rank 0's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from common import distributed
from common.datasets import ImageData
from common.devices import autocast, memory_format, move_to, resolve_device, seed_everything
from common.progress import make_progress
from common.views import ViewGenerator


class TrainConfig(BaseModel):
    """Optimisation settings shared by every loop."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=2)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant", "multistep"] = "cosine"
    milestones: list[int] = Field(
        default_factory=list, description="epochs at which multistep divides lr by 10"
    )
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = Field(
        None, ge=1, description="stop early after this many steps (tests, smoke runs)"
    )
    drop_last: bool = True


def make_optimizer(
    params: Iterator[nn.Parameter] | list[nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """SGD with momentum (nesterov off) or Adam, with the config's weight decay."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: cosine to zero over all steps, constant, or /10 at each milestone epoch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if cfg.schedule == "multistep":
        marks = [m * steps_per_epoch for m in cfg.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, marks, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def minibatches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True
) -> list[torch.Tensor]:
    """One epoch of shuffled index batches (the last partial batch dropped when ``drop_last``)."""
    return split_batches(torch.randperm(n, generator=generator), batch_size, drop_last)


def split_batches(order: torch.Tensor, batch_size: int, drop_last: bool = True) -> list[torch.Tensor]:
    """Cut an index order into batches (the last partial batch dropped when ``drop_last``)."""
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """How many batches :func:`minibatches` yields for ``n`` samples."""
    batches = math.ceil(n / batch_size)
    if drop_last and batches > 1 and n % batch_size:
        batches -= 1
    return batches


StepFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
"""``step(net, batch_indices, generator)`` -> loss; the forward must go through ``net``."""
EpochHook = Callable[[int], dict[str, float]]


def run_steps(
    model: nn.Module,
    n_samples: int,
    step: StepFn,
    cfg: TrainConfig,
    params: list[nn.Parameter] | None = None,
    description: str = "train",
    on_epoch_end: EpochHook | None = None,
    progress: bool | None = None,
    net: nn.Module | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """Generic loop: ``step(net, batch_indices, generator)`` returns the loss; this does the rest.

    ``net`` is the module the step calls for its forward (default ``model``; an attack passes its
    surrogate's representation, :meth:`common.models.ImageModel.representation`). Under a process
    group it is wrapped in DistributedDataParallel, every rank draws the same permutation and takes
    its shard (:func:`common.distributed.shard`), and the step's own randomness (views) comes from a
    generator seeded by (seed, rank). Returns one history row per epoch: mean loss (over ranks),
    learning rate, seconds, and what ``on_epoch_end`` adds (e.g. a kNN monitor). ``on_step(done)``
    is called after every optimizer step with the number of steps done so far.
    """
    context = distributed.current()
    generator = seed_everything(cfg.seed)
    step_generator = generator
    if context.enabled:
        step_generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + context.rank)
        device = next(model.parameters()).device
        forward = distributed.wrap(net if net is not None else model, device, context)
    else:
        forward = net if net is not None else model
    per_rank = n_samples // context.world_size if context.enabled else n_samples
    steps_per_epoch = batches_per_epoch(per_rank, cfg.batch_size, cfg.drop_last)
    optimizer = make_optimizer(params if params is not None else list(model.parameters()), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    history: list[dict[str, float]] = []
    done = 0
    model.train()
    with make_progress(progress if context.is_main else False) as bar:
        task = bar.add_task(description, total=total_steps, status="")
        for epoch in range(cfg.epochs):
            started, losses = time.perf_counter(), []
            order = distributed.shard(torch.randperm(n_samples, generator=generator), context)
            for batch in split_batches(order, cfg.batch_size, cfg.drop_last):
                if done >= total_steps:
                    break
                loss = step(forward, batch, step_generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                done += 1
                if on_step is not None:
                    on_step(done)
                    model.train()
                bar.update(task, advance=1, status=f"epoch {epoch + 1}/{cfg.epochs} loss {losses[-1]:.4f}")
            row = {
                "epoch": float(epoch + 1),
                "loss": distributed.mean_over_ranks(sum(losses) / max(1, len(losses)), context),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
            if on_epoch_end is not None:
                row.update(on_epoch_end(epoch))
                model.train()
            history.append(row)
            if done >= total_steps:
                break
    model.eval()
    return history


def batch_to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 or float images -> float32 in [0, 1] on ``device``, channels_last on CUDA."""
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return x.contiguous(memory_format=memory_format(device))


def train_classifier(
    model: nn.Module,
    data: ImageData,
    cfg: TrainConfig,
    augment: ViewGenerator | None = None,
    on_epoch_end: EpochHook | None = None,
    progress: bool | None = None,
) -> list[dict[str, float]]:
    """Supervised training with cross-entropy on ``data`` (optionally on augmented views)."""
    device = resolve_device(cfg.device)
    move_to(model, device)
    labels = data.labels.to(device)

    def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = batch_to_device(data.images[batch], device)
        if augment is not None:
            x = augment(x, generator)
        with autocast(device):
            return F.cross_entropy(net(x), labels[batch.to(device)])

    return run_steps(
        model, len(data), step, cfg, description="classifier", on_epoch_end=on_epoch_end, progress=progress
    )


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al., ICML 2020) for two batches of paired projections.

    Each of the 2B embeddings (L2-normalised) has its pair as the positive and the other 2B - 2 as
    negatives; cross-entropy over cosine similarities / ``temperature`` (SimCLR CIFAR default 0.5).
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def train_simclr(
    encoder: nn.Module,
    data: ImageData,
    cfg: TrainConfig,
    views: ViewGenerator,
    temperature: float = 0.5,
    on_epoch_end: EpochHook | None = None,
    progress: bool | None = None,
) -> list[dict[str, float]]:
    """SimCLR self-supervised training: two views per image, NT-Xent on the projection head."""
    device = resolve_device(cfg.device)
    move_to(encoder, device)

    def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = batch_to_device(data.images[batch], device)
        v1, v2 = views(x, generator), views(x, generator)
        with autocast(device):
            z = net(torch.cat([v1, v2]))
        return nt_xent(z[: len(batch)], z[len(batch) :], temperature)

    return run_steps(
        encoder, len(data), step, cfg, description="simclr", on_epoch_end=on_epoch_end, progress=progress
    )


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch_size: int = 512, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Model outputs (logits or projections) for uint8/float images, in eval mode, on the CPU."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outs = [model(batch_to_device(chunk, device)).float().cpu() for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)

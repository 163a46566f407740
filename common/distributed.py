"""Data-parallel surrogate training under ``torchrun`` (DistributedDataParallel).

    torchrun --nproc_per_node 4 --no-python stealrange attack rda --url ... --budget 20000 --out runs/rda

Every process runs the same attack code with the same seed. Only rank 0 talks to the victim: the
answers of every query it pays for are broadcast to the other ranks (:func:`broadcast_call`), so a
run on N GPUs spends the budget once. Training then follows PyTorch's DistributedSampler recipe:
each epoch's permutation is drawn from the shared seed, rank ``r`` takes every ``world``-th index
of it (truncated to a multiple of the world size so that every rank does the same number of steps),
each rank's batch is the configured batch size (the effective batch is ``world x batch_size``), and
DDP averages the gradients. BatchNorm statistics stay per rank (DDP broadcasts rank 0's buffers at
each forward), as in torchvision's reference recipes without ``--sync-bn``.

The backend is NCCL when the process has a CUDA device (``cuda:LOCAL_RANK``) and gloo on the CPU;
the CPU path is what the tests run (2 processes, gloo).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from common.devices import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` and its rank on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that queries the victim, shows progress and writes results."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment names a world of more than one process (``torchrun`` sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_local_only: contextvars.ContextVar[bool] = contextvars.ContextVar("local_only", default=False)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside it, :func:`current` is a single process even under ``torchrun``: for work one rank
    does alone (rank 0's evaluation references), which must not wait for the others' gradients."""
    token = _local_only.set(True)
    try:
        yield
    finally:
        _local_only.reset(token)


def current() -> DistributedContext:
    """The context of the initialised process group, or a single process when there is none (or
    inside :func:`local_only`)."""
    if _local_only.get():
        return DistributedContext()
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        )
    return DistributedContext()


def init_from_env(device_spec: str = "auto") -> tuple[DistributedContext, torch.device]:
    """Join the process group ``torchrun`` describes (idempotent) and pick this rank's device.

    Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing is initialised and the device is
    ``resolve_device(device_spec)``. Under it, ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` when
    CUDA is present; the backend is NCCL on CUDA and gloo on the CPU.
    """
    if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
        return DistributedContext(), resolve_device(device_spec)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return current(), device


def shutdown() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(order: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """This rank's part of an epoch's permutation: every ``world``-th index from ``rank``, after
    truncating to a multiple of the world size (DistributedSampler with ``drop_last``)."""
    if not context.enabled:
        return order
    usable = len(order) - len(order) % context.world_size
    return order[:usable][context.rank :: context.world_size]


def broadcast_call(fn: Callable[[], T], context: DistributedContext | None = None) -> T:
    """Run ``fn`` on rank 0 only and give every rank its result (pickled, any object).

    An exception on rank 0 is re-raised on every rank (as a ``RuntimeError`` naming it on the
    others), so no rank waits forever for an answer that will not come.
    """
    context = context or current()
    if not context.enabled:
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if context.is_main:
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:  # every failure must reach the other ranks
            error = exc
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if error is not None:
        raise error
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def wrap(net: nn.Module, device: torch.device, context: DistributedContext | None = None) -> nn.Module:
    """``net`` wrapped in DistributedDataParallel when several processes train, else ``net``.

    ``net`` must use all its trainable parameters in its forward (DDP's default, and the fast path).
    """
    context = context or current()
    if not context.enabled:
        return net
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids)


def mean_over_ranks(value: float, context: DistributedContext | None = None) -> float:
    """The mean of a scalar over all ranks (the value itself in a single process)."""
    context = context or current()
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size

"""Device selection: ``auto`` picks CUDA when present, else the CPU."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto | cpu | cuda | cuda:i`` into a device; asking for absent CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:i") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:i")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator seeded the same for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bfloat16 autocast on CUDA (AMP); a no-op on the CPU so CPU runs stay bit-reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (faster convolutions with AMP), contiguous elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def move_to(module: ModuleT, device: torch.device) -> ModuleT:
    """``module`` moved to ``device`` in that device's memory format (:func:`memory_format`), in place."""
    # torch's stubs lack Module.to's memory_format keyword, which it accepts at run time.
    module.to(device, memory_format=memory_format(device))  # type: ignore[call-overload]
    return module


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block and restore its training flag after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

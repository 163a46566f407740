"""Tests of common.devices: device resolution, seeding, autocast/memory format, eval_mode."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common.devices import autocast, eval_mode, memory_format, resolve_device, seed_everything

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present on this machine")


@no_cuda
def test_auto_is_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_auto_picks_cuda_when_present(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_absent_cuda_is_an_error(spec: str):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["mps", "meta", "xpu"])
def test_unsupported_device_types(spec: str):
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["nonsense", "", "gpu"])
def test_malformed_specs_raise(spec: str):
    with pytest.raises((ValueError, RuntimeError)):
        resolve_device(spec)


def _draw() -> tuple[float, float, torch.Tensor, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3), torch.randn(2)


def test_seed_everything_is_reproducible():
    g1 = seed_everything(123)
    first = _draw()
    from_g1 = torch.rand(4, generator=g1)
    g2 = seed_everything(123)
    second = _draw()
    from_g2 = torch.rand(4, generator=g2)
    assert first[:2] == second[:2]
    assert torch.equal(first[2], second[2])
    assert torch.equal(first[3], second[3])
    assert torch.equal(from_g1, from_g2)
    assert g1.device == torch.device("cpu")
    seed_everything(124)
    assert _draw()[0] != first[0]


def test_seed_everything_accepts_large_seeds():
    seed_everything(2**40 + 5)
    a = float(np.random.rand())
    seed_everything(2**40 + 5)
    assert float(np.random.rand()) == a


def test_cpu_autocast_and_memory_format():
    cpu = torch.device("cpu")
    assert memory_format(cpu) == torch.contiguous_format
    assert memory_format(torch.device("cuda")) == torch.channels_last
    with autocast(cpu):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32


def test_eval_mode_restores_training_flag():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    with eval_mode(model) as m:
        assert m is model
        assert not model.training
        assert not model[1].training
    assert model.training
    assert model[1].training

    model.eval()
    with eval_mode(model):
        assert not model.training
    assert not model.training


def test_eval_mode_restores_on_exception():
    model = torch.nn.Linear(2, 2)
    model.train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training

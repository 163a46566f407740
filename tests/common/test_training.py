"""Tests of common.training: NT-Xent against a literal loop, batching, schedules, the loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from common.datasets import make_synthetic
from common.metrics import accuracy
from common.models import Classifier, Encoder, SmallCNN
from common.training import (
    TrainConfig,
    make_optimizer,
    make_scheduler,
    minibatches,
    nt_xent,
    predict,
    run_steps,
    train_classifier,
    train_simclr,
)
from common.views import ViewConfig, ViewGenerator


def tiny_classifier(channels: int = 1, classes: int = 10, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    backbone = SmallCNN(channels, widths=(16, 16, 16), feature_dim=32)
    return Classifier(backbone, classes, [0.5] * channels, [0.25] * channels)


def tiny_encoder(channels: int = 3, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    backbone = SmallCNN(channels, widths=(16, 16, 16), feature_dim=16)
    return Encoder(backbone, [0.5] * channels, [0.25] * channels, projection_dim=8)


# --- NT-Xent ---------------------------------------------------------------------------------------


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR: mean over the 2B anchors of -log(exp(sim(i,pos)/t) / sum_{k != i} exp(sim(i,k)/t))."""
    z = [v.double() for v in torch.cat([z1, z2])]
    n = len(z1)

    def sim(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a @ b).item() / (a.norm().item() * b.norm().item())

    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        num = math.exp(sim(z[i], z[pos]) / t)
        den = sum(math.exp(sim(z[i], z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 4])
def test_nt_xent_matches_literal_loop(temperature: float, batch: int):
    g = torch.Generator().manual_seed(batch)
    z1 = torch.randn(batch, 5, generator=g) * 3
    z2 = torch.randn(batch, 5, generator=g)
    got = nt_xent(z1, z2, temperature)
    assert got.dim() == 0
    assert got.item() == pytest.approx(nt_xent_reference(z1, z2, temperature), rel=1e-5, abs=1e-6)


def test_nt_xent_identical_views_beat_random_ones():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(8, 16, generator=g), 0.1)


def test_nt_xent_has_gradients():
    z1 = torch.randn(4, 6, requires_grad=True)
    z2 = torch.randn(4, 6, requires_grad=True)
    nt_xent(z1, z2, 0.5).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    assert z2.grad is not None and torch.isfinite(z2.grad).all()


# --- mini-batches and schedules ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (9, 3), (5, 8), (1, 2)])
def test_minibatches_cover_every_index_once(n: int, batch_size: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two epochs, two different permutations, each complete
        batches = minibatches(n, batch_size, g, drop_last=False)
        assert len(batches) == math.ceil(n / batch_size)
        assert all(len(b) <= batch_size for b in batches)
        assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))


def test_minibatches_drop_the_tail():
    g = torch.Generator().manual_seed(0)
    batches = minibatches(10, 3, g, drop_last=True)
    assert [len(b) for b in batches] == [3, 3, 3]
    flat = torch.cat(batches)
    assert len(flat.unique()) == 9
    assert bool(((flat >= 0) & (flat < 10)).all())
    assert [len(b) for b in minibatches(9, 3, g, drop_last=True)] == [3, 3, 3]


def test_minibatches_are_seeded_and_shuffled():
    a = minibatches(50, 10, torch.Generator().manual_seed(3), drop_last=False)
    b = minibatches(50, 10, torch.Generator().manual_seed(3), drop_last=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(a), torch.arange(50))


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    opt = make_optimizer([param], cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(cfg.epochs * steps_per_epoch):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_cosine_schedule_decays_to_zero():
    lrs = _lrs(TrainConfig(epochs=3, lr=0.2, schedule="cosine"), steps_per_epoch=4)
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[6] == pytest.approx(0.1)  # half way: cos(pi/2) = 0
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_multistep_schedule_divides_at_milestones():
    lrs = _lrs(TrainConfig(epochs=4, lr=0.1, schedule="multistep", milestones=[1, 3]), steps_per_epoch=5)
    assert lrs[:5] == pytest.approx([0.1] * 5)
    assert lrs[5:15] == pytest.approx([0.01] * 10)
    assert lrs[15:] == pytest.approx([0.001] * 6)


def test_constant_schedule():
    assert _lrs(TrainConfig(epochs=2, lr=0.3, schedule="constant"), 3) == pytest.approx([0.3] * 7)


def test_optimizers():
    param = nn.Parameter(torch.zeros(1))
    sgd = make_optimizer([param], TrainConfig(lr=0.1, momentum=0.8, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8
    assert sgd.param_groups[0]["weight_decay"] == 1e-3
    adam = make_optimizer([param], TrainConfig(optimizer="adam", lr=1e-3))
    assert isinstance(adam, torch.optim.Adam)


# --- run_steps -------------------------------------------------------------------------------------


def test_run_steps_honours_max_steps_and_hook():
    model = nn.Linear(2, 1)
    seen: list[torch.Tensor] = []
    losses: list[float] = []
    modes: list[bool] = []

    def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen.append(batch)
        modes.append(model.training)
        loss = model(torch.ones(len(batch), 2)).pow(2).mean() + len(seen)
        losses.append(loss.item())
        return loss

    hook_calls: list[int] = []

    def hook(epoch: int) -> dict[str, float]:
        hook_calls.append(epoch)
        model.eval()  # run_steps must put the model back in training mode
        return {"probe": 10.0 * epoch}

    cfg = TrainConfig(epochs=5, batch_size=4, lr=0.01, device="cpu", max_steps=3)
    history = run_steps(model, 10, step, cfg, on_epoch_end=hook, progress=False)

    assert len(seen) == 3  # 2 steps per epoch (drop_last), stopped after 3
    assert all(len(b) == 4 for b in seen)
    assert all(modes)
    assert not model.training
    assert hook_calls == [0, 1]
    assert [row["epoch"] for row in history] == [1.0, 2.0]
    assert [row["probe"] for row in history] == [0.0, 10.0]
    assert history[0]["loss"] == pytest.approx(sum(losses[:2]) / 2)
    assert history[1]["loss"] == pytest.approx(losses[2])
    for row in history:
        assert set(row) == {"epoch", "loss", "lr", "seconds", "probe"}
        assert row["seconds"] >= 0


def test_run_steps_full_epochs_without_max_steps():
    model = nn.Linear(2, 1)
    calls: list[int] = []

    def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append(len(batch))
        return model(torch.ones(len(batch), 2)).pow(2).mean()

    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.01, device="cpu", drop_last=False)
    history = run_steps(model, 10, step, cfg, progress=False)
    assert calls == [4, 4, 2] * 3
    assert len(history) == 3
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine over all 9 steps


def test_run_steps_only_updates_given_params():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    frozen = model[0].weight.detach().clone()

    def step(net: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return model(torch.ones(len(batch), 2)).pow(2).mean()

    cfg = TrainConfig(epochs=1, batch_size=2, lr=0.1, device="cpu", weight_decay=0.0)
    run_steps(model, 4, step, cfg, params=list(model[1].parameters()), progress=False)
    assert torch.equal(model[0].weight, frozen)


# --- the loops -------------------------------------------------------------------------------------


CLF_CFG = TrainConfig(epochs=3, batch_size=32, lr=0.05, device="cpu")


def test_train_classifier_learns_synthetic_data():
    data = make_synthetic(n=256, classes=10, channels=1, size=28, seed=0)
    model = tiny_classifier()
    history = train_classifier(model, data, CLF_CFG, progress=False)
    assert len(history) == 3
    assert all(math.isfinite(row["loss"]) for row in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert not model.training
    train_acc = accuracy(predict(model, data.images), data.labels)
    assert train_acc > 0.6  # chance is 0.1


def test_train_classifier_is_bit_reproducible_on_cpu():
    data = make_synthetic(n=256, classes=10, channels=1, size=28, seed=1)
    states = []
    for _ in range(2):
        model = tiny_classifier(seed=5)
        train_classifier(model, data, CLF_CFG.model_copy(update={"seed": 7, "max_steps": 8}), progress=False)
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    other = tiny_classifier(seed=5)
    train_classifier(other, data, CLF_CFG.model_copy(update={"seed": 8, "max_steps": 8}), progress=False)
    assert not torch.equal(other.head.weight, states[0]["head.weight"])


def test_train_classifier_with_augmentation_runs():
    data = make_synthetic(n=32, classes=4, channels=3, size=16, seed=0)
    model = tiny_classifier(channels=3, classes=4)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, device="cpu", max_steps=2)
    history = train_classifier(model, data, cfg, augment=ViewGenerator(ViewConfig.simclr()), progress=False)
    assert len(history) == 1
    assert math.isfinite(history[0]["loss"])


def test_train_simclr_runs_max_steps():
    data = make_synthetic(n=40, classes=4, channels=3, size=16, seed=0)
    encoder = tiny_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.05, device="cpu", max_steps=3)
    history = train_simclr(encoder, data, cfg, ViewGenerator(ViewConfig.simclr()), progress=False)
    assert len(history) == 1  # 5 steps per epoch, stopped after 3
    assert all(math.isfinite(row["loss"]) for row in history)
    assert history[0]["loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_predict_restores_mode_and_batches():
    model = tiny_classifier(classes=3)
    model.train()
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    out = predict(model, images, batch_size=2)
    assert out.shape == (5, 3)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = model(images.float() / 255)
    torch.testing.assert_close(out, expected)
    assert predict(model, images[:0]).numel() == 0


@pytest.mark.parametrize(
    ("n", "batch", "drop_last"), [(10, 3, True), (10, 3, False), (9, 3, True), (2, 5, True), (2, 5, False)]
)
def test_batches_per_epoch_matches_minibatches(n: int, batch: int, drop_last: bool) -> None:
    from common.training import batches_per_epoch

    assert batches_per_epoch(n, batch, drop_last) == len(
        minibatches(n, batch, torch.Generator().manual_seed(0), drop_last)
    )

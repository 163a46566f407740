"""MAD (Prediction Poisoning) and Adaptive Misinformation against literal reference computations."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from common.checkpoints import InputSpec, card_for, load_checkpoint, save_checkpoint
from common.datasets import get_dataset
from common.models import build_model
from defenses.base import DefenseContext, DefensePipeline, image_digests
from defenses.output.adaptive_misinformation import (
    AdaptiveMisinformation,
    misinformation_weight,
    reinitialised_copy,
    reverse_cross_entropy,
    train_misinformation_model,
)
from defenses.output.mad import (
    MAD,
    argmax_preserving_target,
    line_search,
    log_likelihood_jacobian,
    mad_objective,
    reinitialised,
    step_towards,
    vertex_objectives,
)


class Tiny(nn.Module):
    """A 2-layer MLP on 1x4x4 images: small enough for loop-by-loop references."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh())
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def context_for(x: torch.Tensor, key: str = "k") -> DefenseContext:
    digests = image_digests((x * 255).to(torch.uint8).numpy())
    return DefenseContext(key, "m", digests, b"secret", inputs=x)


def distributions(n: int, c: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * sharpness, dim=1)


# ------------------------------------------------------------------------------------------------ MAD


def test_mad_params_are_checked() -> None:
    with pytest.raises(ValidationError):
        MAD(epsilon=-0.1)
    with pytest.raises(ValidationError):
        MAD(norm="linf")
    with pytest.raises(ValidationError):
        MAD(jacobian="some")
    with pytest.raises(ValidationError):
        MAD(objective="angle")
    with pytest.raises(ValidationError):
        MAD(argmax_method="clip")
    with pytest.raises(RuntimeError, match="bind"):
        MAD().apply(torch.full((1, 4), 0.25), context_for(torch.rand(1, 1, 4, 4)))


def test_jacobian_matches_autograd_loop() -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(3, 1, 4, 4)
    names = [n for n, _ in model.named_parameters()]
    G = log_likelihood_jacobian(model, x, names)
    assert G.shape == (3, 4, sum(p.numel() for p in model.parameters()))
    for i in range(3):
        for k in range(4):
            model.zero_grad()
            torch.log_softmax(model(x[i : i + 1]), dim=1)[0, k].backward()
            expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            torch.testing.assert_close(G[i, k], expected, rtol=1e-4, atol=1e-6)


def test_vertex_objectives_are_the_objective_at_each_vertex() -> None:
    g = torch.Generator().manual_seed(1)
    G = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = distributions(2, 5, seed=2)
    table = vertex_objectives(G, y)
    for k in range(5):
        vertex = torch.nn.functional.one_hot(torch.full((2,), k), 5).double()
        torch.testing.assert_close(table[:, k], mad_objective(G, vertex, y))
    # The literal objective: ||u/|u| - v/|v|||^2 with u = G^T y~, v = G^T y.
    u, v = G[0].T @ torch.eye(5, dtype=torch.float64)[3], G[0].T @ y[0]
    assert table[0, 3].item() == pytest.approx(float((u / u.norm() - v / v.norm()).pow(2).sum()))
    # The unnormalised objective (the released class default, objmax False): ||G^T e_k - G^T y||^2.
    assert vertex_objectives(G, y, "unnormalised")[0, 3].item() == pytest.approx(float((u - v).pow(2).sum()))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    classes=st.integers(2, 8),
    epsilon=st.floats(0.0, 2.0),
    norm=st.sampled_from(["l1", "l2"]),
    preserve=st.booleans(),
)
def test_step_stays_a_distribution_within_the_bound(
    seed: int, classes: int, epsilon: float, norm: str, preserve: bool
) -> None:
    y = distributions(4, classes, seed)
    target = torch.randint(0, classes, (4,), generator=torch.Generator().manual_seed(seed))
    y_tilde = step_towards(y, target, epsilon, norm, preserve)
    assert (y_tilde >= -1e-12).all()
    torch.testing.assert_close(y_tilde.sum(dim=1), torch.ones(4, dtype=torch.float64))
    distance = (y_tilde - y).abs().sum(dim=1) if norm == "l1" else (y_tilde - y).norm(dim=1)
    assert (distance <= epsilon + 1e-9).all()
    if preserve:
        assert torch.equal(y_tilde.argmax(dim=1), y.argmax(dim=1))
    # Full step when the bound allows it (a = epsilon / (reach + 1e-7) >= 1): the vertex itself.
    vertex = torch.nn.functional.one_hot(target, classes).double()
    reach = (vertex - y).abs().sum(dim=1) if norm == "l1" else (vertex - y).norm(dim=1)
    if not preserve:
        for i in torch.nonzero(reach + 1e-7 <= epsilon).flatten():
            torch.testing.assert_close(y_tilde[i], vertex[i])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    classes=st.sampled_from([2, 3, 5, 10, 11, 14]),
    epsilon=st.floats(0.0, 2.0),
    norm=st.sampled_from(["l1", "l2"]),
    objective=st.sampled_from(["normalised", "unnormalised"]),
)
def test_mad_argmax_search_keeps_the_label_within_the_bound(
    seed: int, classes: int, epsilon: float, norm: str, objective: str
) -> None:
    y = distributions(3, classes, seed)
    G = torch.randn(3, classes, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gram = G @ G.transpose(1, 2)
    y_star = torch.stack([argmax_preserving_target(gram[i], y[i], objective) for i in range(3)])
    torch.testing.assert_close(y_star.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(y_star.argmax(dim=1), y.argmax(dim=1))
    y_tilde = line_search(y, y_star, epsilon, norm)
    assert (y_tilde >= 0).all() and torch.equal(y_tilde.argmax(dim=1), y.argmax(dim=1))
    distance = (y_tilde - y).abs().sum(dim=1) if norm == "l1" else (y_tilde - y).norm(dim=1)
    assert (distance <= epsilon + 1e-9).all()


def test_mad_defense_end_to_end() -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(16, 1, 4, 4)
    y = torch.softmax(model(x).detach() * 4, dim=1)
    mad = MAD(epsilon=0.4, proxy_seed=3, jacobian="all")
    mad.bind(model, None, None)  # type: ignore[arg-type]
    out = mad.apply(y, context_for(x))
    assert out.dtype == y.dtype and out.shape == y.shape
    torch.testing.assert_close(out.sum(dim=1), torch.ones(16))
    assert ((out - y).abs().sum(dim=1) <= 0.4 + 1e-5).all()
    # Deterministic (no randomness at all) and the perturbation points at the best vertex.
    torch.testing.assert_close(mad.apply(y, context_for(x)), out)
    G = log_likelihood_jacobian(reinitialised(model, 3), x, [n for n, _ in model.named_parameters()])
    best = vertex_objectives(G.double(), y.double()).argmax(dim=1)
    moved = (out - y).argmax(dim=1)
    assert torch.equal(moved, best)
    # The attacker's gradient direction really turns: the objective rises from 0.
    assert (mad_objective(G.double(), out.double(), y.double()) > 1e-4).all()
    # The proxy is not the victim (whose own G^T y is ~0) and its seed matters.
    assert not torch.equal(mad.proxy.head.weight, model.head.weight)
    last = MAD(epsilon=0.4)  # the released default: the last layer's weight
    last.bind(model, None, None)  # type: ignore[arg-type]
    assert last.names == ("head.weight",)


# ---------------------------------------------------------------------------- Adaptive Misinformation


def test_misinformation_formulas_match_the_paper() -> None:
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 4
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    p = torch.softmax(logits, dim=1)
    literal = -torch.log(1 - p[torch.arange(6), labels]).mean()
    torch.testing.assert_close(reverse_cross_entropy(logits, labels), literal)
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(misinformation_weight(s, 0.5, 10.0), 1 / (1 + torch.exp(10.0 * (s - 0.5))))
    with pytest.raises(ValidationError):
        AdaptiveMisinformation(tau=1.5)
    with pytest.raises(ValidationError):
        AdaptiveMisinformation(nu=0)


@pytest.fixture
def synthetic_classifier(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("classifier", "small_cnn", 1, [0.5], [0.5])
    card = card_for(
        model,
        "syn",
        "small_cnn",
        input=InputSpec(channels=1, height=28, width=28),
        classes=[str(i) for i in range(10)],
        dataset="synthetic",
    )
    save_checkpoint(model, card, tmp_path / "syn")
    return tmp_path / "syn"


def test_adaptive_misinformation_blends_by_confidence(synthetic_classifier: Path) -> None:
    model, card = load_checkpoint(synthetic_classifier)
    with pytest.raises(ValueError, match="train-misinformation"):
        AdaptiveMisinformation().bind(model, card, synthetic_classifier)
    metrics = train_misinformation_model(synthetic_classifier, epochs=1, train_size=256, progress=False)
    assert (synthetic_classifier / "misinformation" / "card.json").is_file()
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    defense = AdaptiveMisinformation(tau=0.5, nu=1000.0)
    pipeline = DefensePipeline([defense])
    pipeline.bind(model, card, synthetic_classifier)
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([[0.97] + [0.03 / 9] * 9, [0.6] + [0.4 / 9] * 9, [0.3] + [0.7 / 9] * 9, [0.1] * 10])
    out = pipeline.apply(y, context_for(x))
    with torch.inference_mode():
        y_hat = torch.softmax(defense.misinformation_model(x), dim=1)
    torch.testing.assert_close(out[:2], y[:2], atol=1e-6, rtol=0)  # in distribution: the truth
    torch.testing.assert_close(out[2:], y_hat[2:], atol=1e-6, rtol=0)  # out of distribution: misinformation
    torch.testing.assert_close(out.sum(dim=1), torch.ones(4))


def test_misinformation_training_lowers_the_true_class(synthetic_classifier: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_classifier, copy)
    train_misinformation_model(copy, epochs=4, train_size=1024, seed=0, progress=False)
    misinformation, _ = load_checkpoint(copy / "misinformation")
    untrained = reinitialised_copy(load_checkpoint(copy)[0], seed=0).eval()
    test = get_dataset("synthetic", "test")
    x, labels = test.images[:256].float() / 255, test.labels[:256]

    def true_class_mass(model: torch.nn.Module) -> float:
        with torch.inference_mode():
            return float(torch.softmax(model(x), dim=1)[torch.arange(256), labels].mean())

    before, after = true_class_mass(untrained), true_class_mass(misinformation)
    assert np.isfinite(after)
    assert after < 0.5 * before  # trained to put (much) less mass on the correct class

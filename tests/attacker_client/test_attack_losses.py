"""The RDA losses against literal, loop-by-loop computations of the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attacker_client.attacks.losses import ALIGN_EPS, align_loss, discriminate_loss, rda_loss


def literal_discriminate(x: list[list[float]], y: list[list[float]], t: float) -> float:
    """-mean_i log( exp(x_i.y_i/t) / [sum_{j!=i} exp(x_i.y_j/t) + sum_{j!=i} exp(x_i.x_j/t)] )."""

    def dot(a: list[float], b: list[float]) -> float:
        return sum(p * q for p, q in zip(a, b, strict=True))

    total = 0.0
    for i in range(len(x)):
        numerator = math.exp(dot(x[i], y[i]) / t)
        denominator = sum(math.exp(dot(x[i], y[j]) / t) for j in range(len(x)) if j != i)
        denominator += sum(math.exp(dot(x[i], x[j]) / t) for j in range(len(x)) if j != i)
        total += -math.log(numerator / denominator)
    return total / len(x)


def literal_align(x: list[list[float]], y: list[list[float]]) -> float:
    """mean_i -log( (cos(x_i, y_i) + 1) / ||x_i - y_i||^2 )."""
    total = 0.0
    for a, b in zip(x, y, strict=True):
        norm_a = math.sqrt(sum(v * v for v in a))
        norm_b = math.sqrt(sum(v * v for v in b))
        cos = sum(p * q for p, q in zip(a, b, strict=True)) / (norm_a * norm_b)
        dist2 = sum((p - q) ** 2 for p, q in zip(a, b, strict=True))
        total += -math.log((cos + 1) / dist2)
    return total / len(x)


def batch(seed: int, b: int = 5, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1) * 0.8  # a prototype: norm < 1
    return x, y


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(2, 6), t=st.sampled_from([0.07, 0.2, 1.0]))
def test_discriminate_matches_the_formula(seed: int, b: int, t: float) -> None:
    x, y = batch(seed, b)
    expected = literal_discriminate(x.tolist(), y.tolist(), t)
    assert discriminate_loss(x, y, t).item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6))
def test_align_matches_the_formula(seed: int, b: int) -> None:
    x, y = batch(seed, b)
    # eps is 1e-8 inside the logs: negligible against distances of order 1.
    assert align_loss(x, y).item() == pytest.approx(literal_align(x.tolist(), y.tolist()), rel=1e-5, abs=1e-5)


def test_rda_loss_is_the_weighted_sum_and_defaults_are_the_papers() -> None:
    x, y = batch(3)
    d, a = discriminate_loss(x, y, 0.07), align_loss(x, y)
    assert rda_loss(x, y).item() == pytest.approx((d + a).item())  # alpha = beta = 1, t = 0.07
    assert rda_loss(x, y, 0.07, alpha=2.0, beta=0.5).item() == pytest.approx((2 * d + 0.5 * a).item())


def test_align_rewards_matching_angle_and_amplitude() -> None:
    x = torch.tensor([[1.0, 0.0]])
    near = align_loss(x, torch.tensor([[0.9, 0.1]]))
    far_angle = align_loss(x, torch.tensor([[0.0, 0.9]]))
    far_amplitude = align_loss(x, torch.tensor([[0.3, 0.03]]))
    assert near < far_angle and near < far_amplitude
    same = align_loss(x, x.clone())  # finite thanks to eps: log(eps) - log(2 + eps)
    assert same.item() == pytest.approx(math.log(ALIGN_EPS) - math.log(2.0), rel=1e-6)


def test_discriminate_pulls_towards_the_own_prototype() -> None:
    y = torch.eye(3)
    assert discriminate_loss(y.clone(), y) < discriminate_loss(y.roll(1, dims=0), y)


def test_losses_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        discriminate_loss(torch.ones(1, 4), torch.ones(1, 4))
    with pytest.raises(ValueError, match="one shape"):
        align_loss(torch.ones(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="one shape"):
        discriminate_loss(torch.ones(4), torch.ones(4))

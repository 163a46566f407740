"""The encoder-stealing losses against literal computations: RDA's formulas loop by loop, and the
StolenEncoder and Cont-Steal baselines as RDA's released code (ShuchiWu/RDA) computes them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacker_client.attacks.losses import (
    ALIGN_EPS,
    align_loss,
    cont_steal_loss,
    discriminate_loss,
    rda_loss,
    stolen_encoder_loss,
)


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


# ------------------------------------------------------------- the baselines as RDA's code computes them


def released_stolen_encoder_mse(
    surrogate_clean: torch.Tensor, surrogate_aug: torch.Tensor, target_embeddings: torch.Tensor
) -> torch.Tensor:
    """``StolenEncoder.py`` (ShuchiWu/RDA), ``steal_train`` with ``loss_function='mse'``, transcribed;
    the prototype bank holds ``F.normalize(target_model(data), dim=-1)`` (``proto_patch`` 1)."""
    loss_function = nn.MSELoss()
    surrogate_embeddings = F.normalize(surrogate_clean, dim=-1)
    surrogate_embeddings_aug = F.normalize(surrogate_aug, dim=-1)
    protos = F.normalize(target_embeddings, dim=-1)
    loss = 0
    loss += loss_function(torch.squeeze(surrogate_embeddings), protos)
    loss += 20 * loss_function(torch.squeeze(surrogate_embeddings_aug), protos)
    return loss


class ReleasedConStealLoss(nn.Module):
    """``ConStealLoss`` of ``Con-Steal.py`` (ShuchiWu/RDA), transcribed; ``steal_train`` calls it as
    ``loss_function(F.normalize(target_model(img_1)), F.normalize(surrogate_model(img_2)))``."""

    def __init__(self, temperature: float = 0.07, batch_size: int = 100) -> None:
        super().__init__()
        self.temperature = temperature
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sim_matrix_1 = torch.exp(torch.mm(x, y.t()) / self.temperature)
        sim_matrix_2 = torch.exp(torch.mm(y, y.t()) / self.temperature)
        mask = (torch.ones_like(sim_matrix_1) - torch.eye(self.batch_size, device=sim_matrix_1.device)).bool()
        neg_sim_matrix_1 = sim_matrix_1.masked_select(mask).view(self.batch_size, -1)
        neg_sim_matrix_2 = sim_matrix_2.masked_select(mask).view(self.batch_size, -1)
        l_pos = torch.exp(torch.sum(x * y, dim=-1) / self.temperature)
        l_neg_1 = torch.sum(neg_sim_matrix_1, dim=-1)
        l_neg_2 = torch.sum(neg_sim_matrix_2, dim=-1)
        l_neg = l_neg_1 + l_neg_2
        loss = (-torch.log(l_pos / l_neg)).mean()
        return loss


def fixed_embeddings(seed: int, b: int = 8, d: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, d, generator=g) * 3 for _ in range(3))


def gradients(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stolen_encoder_loss_is_the_released_normalised_mse(seed: int) -> None:
    clean, aug, victim = (t.requires_grad_() for t in fixed_embeddings(seed))
    ours = stolen_encoder_loss(clean, aug, victim)  # defaults: MSE, lambda 20, normalised
    released = released_stolen_encoder_mse(clean, aug, victim)
    torch.testing.assert_close(ours, released)
    for a, b in zip(gradients(ours, clean, aug), gradients(released, clean, aug), strict=True):
        torch.testing.assert_close(a, b)


def test_stolen_encoder_loss_options() -> None:
    clean, aug, victim = fixed_embeddings(3)
    raw = F.mse_loss(clean, victim) + 20 * F.mse_loss(aug, victim)  # the earlier raw-MSE form
    torch.testing.assert_close(stolen_encoder_loss(clean, aug, victim, normalize=False), raw)
    cosine = -F.cosine_similarity(clean, victim).mean() - 2 * F.cosine_similarity(aug, victim).mean()
    for normalize in (True, False):
        torch.testing.assert_close(stolen_encoder_loss(clean, aug, victim, 2.0, "cosine", normalize), cosine)
    assert not torch.allclose(stolen_encoder_loss(clean, aug, victim), raw)
    with pytest.raises(ValueError, match="kind"):
        stolen_encoder_loss(clean, aug, victim, kind="l1")


@pytest.mark.parametrize(("seed", "t"), [(0, 0.07), (1, 0.07), (2, 0.5)])
def test_cont_steal_loss_is_the_released_con_steal_loss(seed: int, t: float) -> None:
    s, v, _ = fixed_embeddings(seed)
    s = F.normalize(s, dim=1).requires_grad_()
    v = F.normalize(v, dim=1)
    ours = cont_steal_loss(s, v, t)  # default anchor: the victim, as released
    released = ReleasedConStealLoss(t, batch_size=len(s))(v, s)
    torch.testing.assert_close(ours, released)
    torch.testing.assert_close(gradients(ours, s)[0], gradients(released, s)[0])


def test_cont_steal_surrogate_anchor_is_rdas_discriminate_term() -> None:
    s, v, _ = (F.normalize(t, dim=1) for t in fixed_embeddings(4))
    torch.testing.assert_close(cont_steal_loss(s, v, 0.07, "surrogate"), discriminate_loss(s, v, 0.07))
    assert not torch.allclose(cont_steal_loss(s, v, 0.07, "surrogate"), cont_steal_loss(s, v, 0.07))
    with pytest.raises(ValueError, match="anchor"):
        cont_steal_loss(s, v, 0.07, "both")
    with pytest.raises(ValueError, match="at least 2"):
        cont_steal_loss(s[:1], v[:1])

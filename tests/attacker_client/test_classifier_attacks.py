"""Classifier stealing: targets from each output mode, the distillation loss, the transfer set, and
the five UQ methods (reference formulas, distinct members, valid combination, seeded)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from attacker_client.attacks import ClassifierAttack, build_attack
from attacker_client.attacks.classifier import (
    ClassifierOracle,
    TransferSet,
    answers_to_targets,
    distillation_loss,
)
from attacker_client.uq import UQ_METHODS, Monitor, diversity, member_probabilities
from attacker_client.uq.bbb import gaussian_kl
from attacker_client.uq.laplace import last_layer_ggn, tune_prior_precision
from attacker_client.uq.mc_dropout import masked_member
from attacker_client.uq.swag import SWAGPosterior
from common.datasets import make_synthetic
from common.models import Classifier, build_model

TINY = {"epochs": 3, "batch_size": 32, "lr": 0.05, "feature_dim": 16, "lr_step": None}


def tiny_victim() -> Classifier:
    torch.manual_seed(4)
    model = build_model("classifier", "small_cnn", 1, [0.5], [0.5], feature_dim=16)
    assert isinstance(model, Classifier)
    return model.eval()


def oracle_of(victim: Classifier, mode: str = "probabilities") -> ClassifierOracle:
    def ask(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            probs = torch.softmax(victim(torch.from_numpy(images).float() / 255), 1).numpy()
        if mode == "label":
            return answers_to_targets(probs.argmax(1), "label", 10)
        return probs

    return ClassifierOracle(ask, 10, mode)  # type: ignore[arg-type]


# -- targets and loss -------------------------------------------------------------------------------


def test_targets_of_each_output_mode_match_literal_values() -> None:
    probs = np.array([[0.5, 0.3, 0.1, 0.1]], dtype=np.float32)
    assert np.allclose(answers_to_targets(probs, "probabilities", 4), probs)
    assert np.array_equal(answers_to_targets(np.array([2]), "label", 4), [[0, 0, 1, 0]])
    top = (np.array([[0, 1]]), np.array([[0.5, 0.3]]))
    assert np.allclose(answers_to_targets(top, "top_k", 4, "uniform"), [[0.5, 0.3, 0.1, 0.1]])
    assert np.allclose(answers_to_targets(top, "top_k", 4, "renormalize"), [[0.625, 0.375, 0, 0]])
    with pytest.raises(ValueError, match="labels outside"):
        answers_to_targets(np.array([4]), "label", 4)
    with pytest.raises(ValueError, match=r"expected probabilities \[n, 4\]"):
        answers_to_targets(np.ones((2, 3)), "probabilities", 4)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 12).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.integers(1, c),
            st.lists(st.floats(0.01, 10), min_size=c, max_size=c),
            st.sampled_from(["uniform", "renormalize"]),
        )
    )
)
def test_top_k_targets_are_distributions_that_keep_the_argmax(
    case: tuple[int, int, list[float], str],
) -> None:
    classes, k, raw, fill = case
    probs = np.array(raw) / sum(raw)
    order = np.argsort(-probs, kind="stable")[:k]
    targets = answers_to_targets((order[None], probs[order][None]), "top_k", classes, fill)  # type: ignore[arg-type]
    assert targets.shape == (1, classes) and np.all(targets >= 0)
    assert targets.sum() == pytest.approx(1.0, abs=1e-5)
    assert probs[targets.argmax()] == pytest.approx(probs.max())


def test_distillation_loss_against_reference_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=generator)
    targets = torch.softmax(torch.randn(6, 5, generator=generator), 1)
    soft_ce = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(distillation_loss(logits, targets), soft_ce)
    t = 3.0
    sharpened = targets ** (1 / t) / (targets ** (1 / t)).sum(1, keepdim=True)
    reference = -(sharpened * F.log_softmax(logits / t, 1)).sum(1).mean() * t**2
    assert torch.allclose(distillation_loss(logits, targets, t), reference)
    # p^(1/T) renormalised is softmax(logits / T) of any logits whose softmax is p.
    victim_logits = torch.randn(6, 5, generator=generator)
    p = torch.softmax(victim_logits, 1)
    hinton = -(torch.softmax(victim_logits / t, 1) * F.log_softmax(logits / t, 1)).sum(1).mean() * t**2
    assert torch.allclose(distillation_loss(logits, p, t), hinton, atol=1e-6)
    onehot = F.one_hot(torch.tensor([0, 1, 2, 3, 4, 0]), 5).float()
    hard = F.cross_entropy(logits, onehot.argmax(1))
    assert torch.allclose(distillation_loss(logits, onehot, 5.0, hard_labels=True), hard)


def test_transfer_set_is_seeded_and_class_balanced_when_asked() -> None:
    pool = make_synthetic(300, classes=10, seed=1)
    random_a = build_attack("knockoff", {"seed": 3}).choose_samples(pool, 50)
    random_b = build_attack("knockoff", {"seed": 3}).choose_samples(pool, 50)
    assert torch.equal(random_a.images, random_b.images)
    balanced = build_attack("knockoff", {"sampling": "class_balanced"}).choose_samples(pool, 50)
    assert torch.bincount(balanced.labels, minlength=10).tolist() == [5] * 10
    with pytest.raises(ValueError, match="at least 2"):
        build_attack("knockoff").choose_samples(pool, 1)


def test_parameters_are_checked_at_construction() -> None:
    with pytest.raises(ValidationError, match="unknown UQ method"):
        build_attack("ensemble", {"method": "bagging"})
    with pytest.raises(ValidationError, match="p"):
        build_attack("ensemble", {"method": "mc_dropout", "method_params": {"p": 1.5}})
    with pytest.raises(ValidationError, match="temperature"):
        build_attack("knockoff", {"temperature": 0})
    with pytest.raises(ValueError, match="unknown attack 'jbda'"):
        build_attack("jbda")
    with pytest.raises(ValueError, match="rda is an attack of the encoder family, not of the classifier"):
        build_attack("rda", {}, ClassifierAttack)


# -- reference formulas of the UQ pieces -------------------------------------------------------------


def test_diversity_against_literal_values() -> None:
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.7, 0.3]], [[0.3, 0.7], [0.4, 0.6]]])
    row = diversity(probs, reference=torch.tensor([0, 1]))
    expected_var = np.mean([np.var(probs[:, i, c].numpy()) for i in range(2) for c in range(2)])
    assert row["variance"] == pytest.approx(expected_var)
    labels = probs.argmax(2)
    pairs = list(itertools.combinations(range(3), 2))
    assert row["disagreement"] == pytest.approx(
        np.mean([(labels[a] != labels[b]).float().mean().item() for a, b in pairs])
    )
    assert row["member_agreement"] == [1.0, 0.5, 0.5]
    assert row["combined_agreement"] == 1.0  # mean: [0.6, 0.4] -> 0, [0.433, 0.567] -> 1


def test_swag_moments_and_sample_follow_the_paper() -> None:
    thetas = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 1.0]), torch.tensor([2.0, 1.0, 5.0])]
    posterior = SWAGPosterior(max_rank=2)
    means = []
    for theta in thetas:
        posterior.collect(theta)
        means.append(posterior.mean.clone())  # type: ignore[union-attr]
    stacked = torch.stack(thetas).double()
    assert torch.allclose(posterior.mean, stacked.mean(0))  # type: ignore[arg-type]
    assert torch.allclose(posterior.sq_mean, stacked.square().mean(0))  # type: ignore[arg-type]
    # The deviation of each snapshot from the running mean after it was added, the last K kept.
    assert len(posterior.deviations) == 2
    assert torch.allclose(posterior.deviations[-1], stacked[2] - means[2])
    assert torch.allclose(posterior.deviations[0], stacked[1] - means[1])
    sample = posterior.sample(torch.Generator().manual_seed(0), scale=0.5)
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(3, generator=g, dtype=torch.float64)
    z2 = torch.randn(2, generator=g, dtype=torch.float64)
    var = stacked.square().mean(0) - stacked.mean(0).square()
    d = torch.stack(posterior.deviations, 1)
    expected = stacked.mean(0) + 0.5**0.5 * (var.sqrt() * z1 / 2**0.5 + d @ z2 / (2 * (2 - 1)) ** 0.5)
    assert torch.allclose(sample.double(), expected, atol=1e-6)


def test_bbb_kl_matches_torch_distributions() -> None:
    mu, sigma = torch.randn(20), torch.rand(20) + 0.05
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma),
        torch.distributions.Normal(torch.zeros(20), 0.3 * torch.ones(20)),
    ).sum()
    assert torch.allclose(gaussian_kl(mu, sigma, 0.3), reference, atol=1e-5)


def test_laplace_ggn_matches_a_loop_of_kronecker_products() -> None:
    torch.manual_seed(0)
    model = build_model("classifier", "small_cnn", 1, [0.5], [0.5], num_classes=3, feature_dim=4)
    assert isinstance(model, Classifier)
    model.eval()
    images = make_synthetic(7, classes=3, seed=2).images
    reference = torch.zeros(15, 15, dtype=torch.float64)
    with torch.no_grad():
        for image in images:
            x = image[None].float() / 255
            phi = torch.cat([model.features(x)[0].double(), torch.ones(1, dtype=torch.float64)])
            p = torch.softmax(model(x)[0].double(), 0)
            reference += torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(phi, phi))
    assert torch.allclose(last_layer_ggn(model, images), reference, atol=1e-8)


def test_laplace_prior_precision_maximises_the_marginal_likelihood() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(12, 30, generator=generator, dtype=torch.float64)
    ggn, theta = a @ a.T, torch.randn(12, generator=generator, dtype=torch.float64)
    grid = torch.logspace(-4, 4, 161, dtype=torch.float64)

    def log_z(tau: float) -> float:  # the Laplace evidence up to a constant, by log-determinant
        precision = ggn + tau * torch.eye(12, dtype=torch.float64)
        return float(-0.5 * tau * theta @ theta + 6 * np.log(tau) - 0.5 * torch.logdet(precision))

    best = max(grid.tolist(), key=log_z)
    assert tune_prior_precision(ggn, theta) == pytest.approx(best)


def test_mc_dropout_member_is_the_network_under_that_mask() -> None:
    model = tiny_victim()
    mask = (torch.rand(16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    member = masked_member(model, mask, 0.5)
    x = make_synthetic(4, seed=1).images.float() / 255
    with torch.no_grad():
        expected = model.head(model.features(x) * mask / 0.5)
        assert torch.allclose(member(x), expected, atol=1e-5)


# -- the five methods end to end (in process) ----------------------------------------------------------


@pytest.fixture(scope="module")
def transfer() -> tuple[Classifier, torch.Tensor]:
    return tiny_victim(), make_synthetic(120, seed=9).images


@pytest.mark.parametrize("method", UQ_METHODS.names())
def test_each_uq_method_gives_distinct_members_a_distribution_and_repeats(
    method: str, transfer: tuple[Classifier, torch.Tensor]
) -> None:
    victim, held_out = transfer
    pool = make_synthetic(160, seed=5)

    def run() -> tuple[torch.Tensor, list[dict[str, object]]]:
        attack = build_attack("ensemble", {**TINY, "method": method, "members": 3})
        monitor = Monitor(held_out, None)
        result = attack.steal(oracle_of(victim), pool, 128, torch.device("cpu"), False, monitor)
        assert result.queries == result.samples == 128 and len(result.members) == 3
        return member_probabilities(result.members, held_out), monitor.rows

    probs, rows = run()
    combined = probs.mean(0)
    assert torch.all(combined >= 0) and torch.allclose(combined.sum(1), torch.ones(len(held_out)), atol=1e-5)
    for a, b in itertools.combinations(range(3), 2):
        assert (probs[a] - probs[b]).abs().max() > 1e-4, f"members {a} and {b} of {method} are the same"
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["members"] == 3
    assert rows[-1]["variance"] > 0
    again, _ = run()
    assert torch.equal(probs, again)


def test_knockoff_learns_from_labels_only(transfer: tuple[Classifier, torch.Tensor]) -> None:
    victim, held_out = transfer
    reference = member_probabilities([victim], held_out)[0].argmax(1)
    attack = build_attack("knockoff", {**TINY, "epochs": 6})
    monitor = Monitor(held_out, reference)
    result = attack.steal(
        oracle_of(victim, "label"), make_synthetic(400, seed=5), 400, torch.device("cpu"), False, monitor
    )
    assert result.extra["output"] == "label"
    assert monitor.rows[-1]["combined_agreement"] > 0.5  # chance: ~0.1


def test_transfer_set_holds_what_the_oracle_answered() -> None:
    victim = tiny_victim()
    attack = build_attack("knockoff")
    samples = make_synthetic(10, seed=1)
    data = attack.query(oracle_of(victim), samples)
    assert isinstance(data, TransferSet) and len(data) == 10 and not data.hard_labels
    assert torch.allclose(data.targets.sum(1), torch.ones(10))

"""Tests of common.metrics against literal reference formulas on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.metrics import (
    accuracy,
    agreement,
    embedding_fidelity,
    extract_features,
    kl_divergence,
    knn_accuracy,
    knn_predict,
    l1_distance,
    linear_cka,
    linear_map_r2,
    linear_probe,
    mlp_probe,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_accuracy_scores_and_labels():
    labels = torch.tensor([0, 1, 2, 1])
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.0, 0.3, 0.7]])
    assert accuracy(scores, labels) == pytest.approx(0.5)
    assert accuracy(torch.tensor([0, 1, 2, 2]), labels) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        accuracy(torch.tensor([0, 1]), labels)


def test_agreement_scores_or_labels():
    a = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, -1.0]])  # argmax 0, 1, 0
    b = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.6, 0.4]])  # argmax 1, 1, 0
    assert agreement(a, b) == pytest.approx(2 / 3)
    assert agreement(a, torch.tensor([1, 1, 0])) == pytest.approx(2 / 3)
    assert agreement(torch.tensor([0, 1, 0]), b) == pytest.approx(2 / 3)
    assert agreement(b, b) == 1.0


def test_kl_hand_computed():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.1438410...
    row1 = 1.0 * math.log(1.0 / 0.5)  # ln 2; the 0 * log 0 term is 0
    assert kl_divergence(p, q) == pytest.approx((row0 + row1) / 2, abs=1e-7)
    assert kl_divergence(p, q) == pytest.approx(0.4184940, abs=1e-6)
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    # A zero in q where p > 0 is large but finite (clamped at eps).
    value = kl_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert value == pytest.approx(-math.log(1e-8), rel=1e-6)


def test_l1_hand_computed():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    assert l1_distance(p, q) == pytest.approx((0.5 + 1.0) / 2)
    assert l1_distance(p[0], q[0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        l1_distance(p, q[:, :1])


def test_embedding_fidelity_vs_loop():
    a = torch.randn(7, 5, generator=gen(0))
    b = torch.randn(7, 5, generator=gen(1))
    cos, l2, l2n = [], [], []
    for i in range(7):
        ai, bi = a[i].tolist(), b[i].tolist()
        na = math.sqrt(sum(v * v for v in ai))
        nb = math.sqrt(sum(v * v for v in bi))
        cos.append(sum(x * y for x, y in zip(ai, bi, strict=True)) / (na * nb))
        l2.append(math.sqrt(sum((x - y) ** 2 for x, y in zip(ai, bi, strict=True))))
        l2n.append(math.sqrt(sum((x / na - y / nb) ** 2 for x, y in zip(ai, bi, strict=True))))
    got = embedding_fidelity(a, b)
    assert set(got) == {"cosine", "l2", "l2_normalised"}
    assert got["cosine"] == pytest.approx(sum(cos) / 7, abs=1e-6)
    assert got["l2"] == pytest.approx(sum(l2) / 7, abs=1e-6)
    assert got["l2_normalised"] == pytest.approx(sum(l2n) / 7, abs=1e-6)
    same = embedding_fidelity(a, 3.0 * a)
    assert same["cosine"] == pytest.approx(1.0) and same["l2_normalised"] == pytest.approx(0.0, abs=1e-7)


def cka_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. (ICML 2019), Eqs. 3-4 literally: HSIC(K, L) = tr(K H L H) / (n - 1)^2 with
    linear kernels K = X X^T, L = Y Y^T and the centring matrix H = I - 11^T / n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.trace(a @ h @ b @ h).item() / (n - 1) ** 2

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def r2_reference(x: torch.Tensor, y: torch.Tensor, fit: int, ridge: float = 0.0) -> float:
    """Least squares with an explicit column of ones (numpy's lstsq, or the ridge normal equations on
    centred data), fitted on the first ``fit`` rows, 1 - SS_res / SS_tot on the others."""
    xs, ys = x.double().numpy(), y.double().numpy()
    if ridge == 0.0:
        design = np.hstack([xs[:fit], np.ones((fit, 1))])
        coef = np.linalg.lstsq(design, ys[:fit], rcond=None)[0]
        pred = np.hstack([xs[fit:], np.ones((len(xs) - fit, 1))]) @ coef
    else:
        xm, ym = xs[:fit].mean(0), ys[:fit].mean(0)
        xc, yc = xs[:fit] - xm, ys[:fit] - ym
        w = np.linalg.solve(xc.T @ xc + ridge * np.eye(xs.shape[1]), xc.T @ yc)
        pred = (xs[fit:] - xm) @ w + ym
    res = ((ys[fit:] - pred) ** 2).sum()
    tot = ((ys[fit:] - ys[fit:].mean(0)) ** 2).sum()
    return float(1 - res / tot)


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_linear_cka_vs_the_papers_hsic_formula():
    a = torch.randn(20, 6, generator=gen(0), dtype=torch.float64)
    b = a[:, :4] @ torch.randn(4, 3, generator=gen(1), dtype=torch.float64) + 0.5 * torch.randn(
        20, 3, generator=gen(2), dtype=torch.float64
    )
    assert linear_cka(a, b) == pytest.approx(cka_reference(a, b), abs=1e-12)
    assert 0.0 < linear_cka(a, b) < 1.0
    assert linear_cka(a, b) == pytest.approx(linear_cka(b, a), abs=1e-12)  # symmetric
    assert linear_cka(a, a) == pytest.approx(1.0, abs=1e-12)
    # One dimension each: linear CKA is the squared Pearson correlation.
    u, v = torch.tensor([[1.0], [2.0], [3.0], [5.0]]), torch.tensor([[2.0], [1.0], [4.0], [4.0]])
    r = np.corrcoef(u.numpy().ravel(), v.numpy().ravel())[0, 1]
    assert linear_cka(u, v) == pytest.approx(r**2, abs=1e-7)
    with pytest.raises(ValueError):
        linear_cka(a, b[:5])


def test_linear_map_r2_vs_least_squares_reference():
    x = torch.randn(40, 3, generator=gen(3), dtype=torch.float64)
    y = x @ torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 1.0]], dtype=torch.float64) + 0.3
    y = y + 0.5 * torch.randn(40, 2, generator=gen(4), dtype=torch.float64)
    got = linear_map_r2(x, y)
    assert got == pytest.approx(r2_reference(x, y, 20), abs=1e-10)
    assert linear_map_r2(x, y, fit=30) == pytest.approx(r2_reference(x, y, 30), abs=1e-10)
    assert linear_map_r2(x, y, ridge=2.0) == pytest.approx(r2_reference(x, y, 20, ridge=2.0), abs=1e-10)
    assert 0.5 < got < 1.0
    exact = x @ torch.randn(3, 4, generator=gen(5), dtype=torch.float64) - 1.0
    assert linear_map_r2(x, exact) == pytest.approx(1.0, abs=1e-10)
    # Unrelated noise: about 0 (negative is allowed: worse than predicting the mean).
    assert linear_map_r2(x, torch.randn(40, 2, generator=gen(6), dtype=torch.float64)) < 0.3
    with pytest.raises(ValueError):
        linear_map_r2(x, y, fit=39)


def test_invariant_fidelities_are_invariant_and_cosine_is_not():
    """A B4B-like map of the surrogate's side (orthogonal x isotropic scale + shift) leaves CKA and
    R^2 unchanged and wrecks cosine; R^2 is invariant to any invertible affine map, CKA is not."""
    victim = torch.randn(200, 8, generator=gen(7), dtype=torch.float64)
    surrogate = victim + 0.4 * torch.randn(200, 8, generator=gen(8), dtype=torch.float64)
    q, shift = orthogonal(8, 9), torch.randn(8, generator=gen(10), dtype=torch.float64)
    moved = 2.5 * surrogate @ q + shift
    assert linear_cka(moved, victim) == pytest.approx(linear_cka(surrogate, victim), abs=1e-10)
    assert linear_cka(victim, 0.3 * victim @ q - 4.0) == pytest.approx(1.0, abs=1e-10)
    assert linear_map_r2(moved, victim) == pytest.approx(linear_map_r2(surrogate, victim), abs=1e-9)
    general = torch.randn(8, 8, generator=gen(11), dtype=torch.float64) + 3 * torch.eye(
        8, dtype=torch.float64
    )
    skewed = surrogate @ general + shift
    assert linear_map_r2(skewed, victim) == pytest.approx(linear_map_r2(surrogate, victim), abs=1e-9)
    assert linear_cka(skewed, victim) < linear_cka(surrogate, victim) - 0.01
    # Fewer fit rows than dimensions (min-norm fit): still invariant to orthogonal x scale + shift.
    wide_v = torch.randn(30, 50, generator=gen(12), dtype=torch.float64)
    wide_s = wide_v + 0.2 * torch.randn(30, 50, generator=gen(13), dtype=torch.float64)
    wide_moved = 0.7 * wide_s @ orthogonal(50, 14) + 1.0
    assert linear_map_r2(wide_moved, wide_v) == pytest.approx(linear_map_r2(wide_s, wide_v), abs=1e-9)
    # Cosine is not invariant: the same surrogate reads as "another space".
    before = embedding_fidelity(surrogate, victim)["cosine"]
    after = embedding_fidelity(moved, victim)["cosine"]
    assert before > 0.9 and abs(after) < 0.5


def knn_brute_force(train, train_labels, test, classes, k, temperature):
    preds = []
    for t in test.tolist():
        nt = math.sqrt(sum(v * v for v in t))
        sims = []
        for row, label in zip(train.tolist(), train_labels.tolist(), strict=True):
            nr = math.sqrt(sum(v * v for v in row))
            sims.append((sum(x * y for x, y in zip(t, row, strict=True)) / (nt * nr), label))
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * classes
        for sim, label in sims[:k]:
            scores[label] += math.exp(sim / temperature)
        preds.append(max(range(classes), key=lambda c: scores[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize(("k", "temperature", "chunk"), [(1, 0.5, 1024), (5, 0.5, 3), (200, 0.1, 7)])
def test_knn_predict_vs_brute_force(k, temperature, chunk):
    train = torch.randn(40, 6, generator=gen(0))
    labels = torch.randint(0, 4, (40,), generator=gen(1))
    test = torch.randn(17, 6, generator=gen(2))
    got = knn_predict(train, labels, test, classes=4, k=k, temperature=temperature, chunk=chunk)
    expected = knn_brute_force(train, labels, test, 4, min(k, 40), temperature)
    assert got.dtype == torch.long
    assert torch.equal(got, expected)


def test_knn_accuracy_on_clusters():
    centres = torch.eye(3) * 5
    train_labels = torch.arange(3).repeat(10)
    train = centres[train_labels] + 0.3 * torch.randn(30, 3, generator=gen(0))
    test_labels = torch.arange(3).repeat(4)
    test = centres[test_labels] + 0.3 * torch.randn(12, 3, generator=gen(1))
    assert knn_accuracy(train, train_labels, test, test_labels, classes=3, k=5) == 1.0


def blobs(n: int, d: int, classes: int, seed: int, spread: float = 1.0):
    g = gen(seed)
    centres = 4.0 * torch.randn(classes, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, d, generator=g), labels


def test_linear_probe_separable_blobs():
    x, y = blobs(600, 8, 4, seed=0)
    acc = linear_probe(x[:400], y[:400], x[400:], y[400:], classes=4, epochs=15, batch_size=64)
    assert acc > 0.95


def test_linear_probe_random_labels_is_near_chance():
    x = torch.randn(600, 8, generator=gen(0))
    y = torch.randint(0, 4, (600,), generator=gen(1))
    acc = linear_probe(x[:400], y[:400], x[400:], y[400:], classes=4, epochs=15, batch_size=64)
    assert 0.1 < acc < 0.42


def test_linear_probe_seeded_determinism():
    x, y = blobs(300, 6, 3, seed=1, spread=3.0)
    kwargs = {"classes": 3, "epochs": 5, "batch_size": 32}
    a = linear_probe(x[:200], y[:200], x[200:], y[200:], seed=3, **kwargs)
    torch.manual_seed(123)  # the global RNG must not matter
    b = linear_probe(x[:200], y[:200], x[200:], y[200:], seed=3, **kwargs)
    assert a == b
    state = torch.get_rng_state()
    linear_probe(x[:200], y[:200], x[200:], y[200:], seed=3, **kwargs)
    assert torch.equal(state, torch.get_rng_state())


def test_linear_probe_is_linear():
    # XOR is not linearly separable: a linear probe stays near chance, the MLP solves it.
    g = gen(0)
    x = torch.randint(0, 2, (400, 2), generator=g).float()
    y = (x[:, 0] != x[:, 1]).long()
    x = x + 0.05 * torch.randn(400, 2, generator=g)
    lin = linear_probe(x[:300], y[:300], x[300:], y[300:], classes=2, epochs=20, batch_size=64)
    mlp = mlp_probe(x[:300], y[:300], x[300:], y[300:], classes=2, hidden=(16,), epochs=20, batch_size=64)
    assert lin < 0.8
    assert mlp > 0.95


def test_mlp_probe_blobs_and_determinism():
    x, y = blobs(300, 8, 3, seed=2)
    kwargs = {"classes": 3, "hidden": (32, 16), "epochs": 5, "batch_size": 64}
    a = mlp_probe(x[:200], y[:200], x[200:], y[200:], **kwargs)
    assert a > 0.95
    assert a == mlp_probe(x[:200], y[:200], x[200:], y[200:], **kwargs)


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 3)
        self.dropout = nn.Dropout(0.5)
        self.seen_training: list[bool] = []
        self.seen_max: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        self.seen_max.append(float(x.max()))
        return self.dropout(self.linear(x.flatten(1)))


def test_extract_features_uint8_float_batches_and_mode():
    model = Recorder()
    model.train()
    u8 = torch.randint(0, 256, (10, 3, 2, 2), generator=gen(0), dtype=torch.uint8)
    u8[0, 0, 0, 0] = 255
    a = extract_features(model, u8, batch_size=3)
    b = extract_features(model, u8.float() / 255.0, batch_size=10)
    assert a.shape == (10, 3) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, model.linear((u8.float() / 255.0).flatten(1)).detach())
    assert not any(model.seen_training)
    assert max(model.seen_max) <= 1.0
    assert model.training  # restored
    model.eval()
    extract_features(model, u8)
    assert not model.training

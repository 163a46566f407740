"""Metrics of model stealing, each a literal formula checked against a reference in the tests.

Classifier stealing (PAPERS.md, Metrics): accuracy; agreement (fidelity) = mean(argmax student ==
argmax victim) on held-out data; KL(P_victim || P_student) at T = 1; L1 between distributions.

Encoder stealing: downstream accuracy on frozen features of surrogate vs. victim, through

- :func:`knn_predict` / :func:`knn_accuracy`: the weighted kNN monitor of InstDisc (Wu et al. 2018),
  used by SimCLR / MoCo demo code and by the RDA released code (Wu et al., ECCV 2024): cosine
  similarity on L2-normalised features, top ``k = 200`` neighbours, weights ``exp(sim / 0.5)``;
- :func:`linear_probe`: a true linear classifier on standardised features;
- :func:`mlp_probe`: the small MLP (512-256, ReLU) that the RDA released code uses for its final
  numbers (the paper calls it "linear probing");

and :func:`embedding_fidelity` (cosine and L2 between surrogate and victim embeddings), which a
defense that maps each key's embeddings into its own space (B4B: a rotation, a scale, a shuffle of
the dimensions and a shift per key) drives down without defending anything. Two fidelities that such
a map leaves unchanged:

- :func:`linear_cka`: linear centred kernel alignment (Kornblith, Norouzi, Lee & Hinton, ICML 2019),
  ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)``; invariant to an orthogonal transform,
  an isotropic scale and a shift of either side (not to a general linear map);
- :func:`linear_map_r2`: R^2 on held-out rows of the least-squares affine map from the surrogate's
  embeddings to the victim's; invariant to any invertible affine map of the surrogate's side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "accuracy",
    "agreement",
    "embedding_fidelity",
    "extract_features",
    "kl_divergence",
    "knn_accuracy",
    "knn_predict",
    "l1_distance",
    "linear_cka",
    "linear_map_r2",
    "linear_probe",
    "mlp_probe",
]


def _as_labels(x: torch.Tensor) -> torch.Tensor:
    """[N, C] scores -> argmax labels; [N] labels as they are."""
    if x.ndim == 2:
        return x.argmax(dim=1)
    if x.ndim == 1:
        return x.long()
    raise ValueError(f"expected [N, C] scores or [N] labels, got shape {tuple(x.shape)}")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 1:
        return x.unsqueeze(0)
    if x.ndim != 2:
        raise ValueError(f"expected [N, C] rows, got shape {tuple(x.shape)}")
    return x


def accuracy(logits_or_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions; accepts [N, C] scores (argmax taken) or [N] predictions."""
    pred = _as_labels(logits_or_labels)
    labels = labels.reshape(-1).to(pred.device)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
    if pred.numel() == 0:
        raise ValueError("accuracy of an empty set")
    return (pred == labels).double().mean().item()


def agreement(pred_a: torch.Tensor, pred_b: torch.Tensor) -> float:
    """Label agreement (fidelity): ``mean(argmax a == argmax b)``; each is [N, C] scores or [N] labels."""
    return accuracy(pred_a, _as_labels(pred_b))


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> float:
    """Mean over rows of ``KL(p || q) = sum_c p_c (log p_c - log q_c)``; both are probability rows.

    Terms with ``p_c = 0`` contribute 0; probabilities are clamped to ``eps`` inside the logs so that
    a zero in ``q`` gives a large but finite value. For stealing: ``p`` = victim, ``q`` = student.
    """
    p, q = _as_rows(p).double(), _as_rows(q).double().to(p.device)
    if p.shape != q.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(q.shape)}")
    terms = p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())
    return terms.sum(dim=1).mean().item()


def l1_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of ``sum_c |p_c - q_c|``."""
    p, q = _as_rows(p).double(), _as_rows(q).double().to(p.device)
    if p.shape != q.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(q.shape)}")
    return (p - q).abs().sum(dim=1).mean().item()


def embedding_fidelity(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How close two sets of embeddings [N, D] are, row by row.

    Returns ``{"cosine": mean cos(a_i, b_i), "l2": mean ||a_i - b_i||,
    "l2_normalised": mean ||a_i / |a_i| - b_i / |b_i| ||}``.
    """
    a, b = _as_rows(a).double(), _as_rows(b).double().to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return {
        "cosine": F.cosine_similarity(a, b, dim=1, eps=1e-12).mean().item(),
        "l2": (a - b).norm(dim=1).mean().item(),
        "l2_normalised": (F.normalize(a, dim=1) - F.normalize(b, dim=1)).norm(dim=1).mean().item(),
    }


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of two representations of the same N inputs, ``a`` [N, D1] and ``b`` [N, D2]
    (Kornblith et al., ICML 2019, Eq. 5 with a linear kernel): both are centred over the rows, then
    ``||b_c^T a_c||_F^2 / (||a_c^T a_c||_F ||b_c^T b_c||_F)``, in [0, 1].

    Invariant to an orthogonal transform and an isotropic scale of either side and to a shift
    (centring); the widths may differ. 0 when either side is constant.
    """
    a, b = _as_rows(a).double(), _as_rows(b).double().to(a.device)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{a.shape[0]} rows vs {b.shape[0]} rows")
    if a.shape[0] < 2:
        raise ValueError("CKA needs at least 2 rows")
    a = a - a.mean(dim=0, keepdim=True)
    b = b - b.mean(dim=0, keepdim=True)
    cross = (b.T @ a).square().sum()
    norm = torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)
    return 0.0 if norm.item() == 0.0 else (cross / norm).item()


def linear_map_r2(
    source: torch.Tensor, target: torch.Tensor, fit: int | None = None, ridge: float = 0.0
) -> float:
    """R^2 of the least-squares affine map ``source -> target`` fitted on the first ``fit`` rows
    (default: the first half) and scored on the others.

    ``W, c = argmin ||source_fit W + c - target_fit||^2 (+ ridge ||W||^2)`` (minimum-norm solution
    when the fit rows do not determine ``W``: fewer rows than dimensions); on the scored rows,
    ``R^2 = 1 - sum ||target - (source W + c)||^2 / sum ||target - mean(target)||^2`` (the
    variance-weighted R^2 over all target dimensions; the mean is the scored rows'). 1 for a perfect
    map, 0 for predicting the mean, negative for worse. For stealing: ``source`` = surrogate,
    ``target`` = victim.

    With ``ridge`` = 0 it is invariant to any invertible affine map of ``source`` when the fit rows
    outnumber its dimensions; with fewer (500 held-out images of 512-dimensional embeddings) the
    minimum-norm fit interpolates them, and only an orthogonal map, an isotropic scale and a shift
    leave it unchanged.
    """
    x, y = _as_rows(source).double(), _as_rows(target).double().to(source.device)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"{n} rows vs {y.shape[0]} rows")
    fit = n // 2 if fit is None else fit
    if not 2 <= fit <= n - 2:
        raise ValueError(f"fit on {fit} of {n} rows: at least 2 to fit and 2 to score")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    x_fit, y_fit, x_test, y_test = x[:fit], y[:fit], x[fit:], y[fit:]
    x_mean, y_mean = x_fit.mean(dim=0, keepdim=True), y_fit.mean(dim=0, keepdim=True)
    xc, yc = x_fit - x_mean, y_fit - y_mean  # centring fits the intercept exactly
    if ridge > 0:
        eye = torch.eye(xc.shape[1], dtype=xc.dtype, device=xc.device)
        weights = torch.linalg.solve(xc.T @ xc + ridge * eye, xc.T @ yc)
    else:
        weights = torch.linalg.pinv(xc) @ yc
    predicted = (x_test - x_mean) @ weights + y_mean
    residual = (y_test - predicted).square().sum()
    total = (y_test - y_test.mean(dim=0, keepdim=True)).square().sum()
    if total.item() == 0.0:
        raise ValueError("the scored target rows are constant: R^2 is undefined")
    return (1.0 - residual / total).item()


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    classes: int,
    k: int = 200,
    temperature: float = 0.5,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN labels of ``test_features`` (InstDisc / SimCLR / RDA-code kNN monitor).

    Features are L2-normalised; the ``k`` training rows of highest cosine similarity vote with
    weight ``exp(sim / temperature)``; the score of a class is the sum of the weights of the
    neighbours of that class, and the prediction its argmax. Defaults k = 200, temperature = 0.5
    (RDA released code). Test rows are processed ``chunk`` at a time to bound memory.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    bank = F.normalize(train_features.float(), dim=1)
    bank_labels = train_labels.reshape(-1).long().to(bank.device)
    if bank_labels.shape[0] != bank.shape[0]:
        raise ValueError(f"{bank.shape[0]} training features for {bank_labels.shape[0]} labels")
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        query = F.normalize(test_features[start : start + chunk].float().to(bank.device), dim=1)
        sim = query @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(query.shape[0], classes, device=bank.device)
        scores.scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(scores.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=bank.device)
    return torch.cat(preds)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    classes: int,
    k: int = 200,
    temperature: float = 0.5,
) -> float:
    """Accuracy of :func:`knn_predict` on the test set (defaults k = 200, temperature = 0.5)."""
    pred = knn_predict(train_features, train_labels, test_features, classes, k=k, temperature=temperature)
    return accuracy(pred, test_labels)


def _train_probe(
    make_model: Callable[[int], nn.Module],
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    device: torch.device | str | None,
) -> float:
    """Standardise with the train mean/std, train with Adam + cross-entropy in seeded mini-batches,
    return the test accuracy. Leaves torch's global RNG untouched."""
    dev = torch.device(device) if device is not None else train_features.device
    x_train = train_features.float().to(dev)
    x_test = test_features.float().to(dev)
    y_train = train_labels.reshape(-1).long().to(dev)
    y_test = test_labels.reshape(-1).long().to(dev)
    if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise ValueError("features and labels differ in length")
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, keepdim=True).nan_to_num(1.0).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(x_train.shape[1]).to(dev)
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_train.shape[0]
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=shuffle).to(dev)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x_test[s : s + 4096]) for s in range(0, x_test.shape[0], 4096)])
    return accuracy(logits, y_test)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 512,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> float:
    """Test accuracy of a true linear classifier on frozen features.

    Features are standardised with the training mean and std; one ``nn.Linear`` is trained with
    Adam (lr 1e-2, weight decay 1e-4) and cross-entropy for 100 epochs of seeded, shuffled
    mini-batches of 512. Initialisation and shuffling depend only on ``seed``. ``device`` defaults
    to the features' device.
    """
    return _train_probe(
        lambda d: nn.Linear(d, classes),
        train_features,
        train_labels,
        test_features,
        test_labels,
        epochs,
        lr,
        weight_decay,
        batch_size,
        seed,
        device,
    )


def mlp_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    classes: int,
    hidden: tuple[int, ...] = (512, 256),
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 512,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> float:
    """Test accuracy of a small MLP on frozen features (hidden 512-256, ReLU, as in the RDA code).

    The RDA released code reports its final numbers with this MLP although the paper says "linear
    probing"; report it beside :func:`linear_probe`. Same recipe as :func:`linear_probe`.
    """

    def make(d: int) -> nn.Module:
        layers: list[nn.Module] = []
        width = d
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        return nn.Sequential(*layers)

    return _train_probe(
        make,
        train_features,
        train_labels,
        test_features,
        test_labels,
        epochs,
        lr,
        weight_decay,
        batch_size,
        seed,
        device,
    )


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Run ``model`` in eval mode over ``images`` in batches; return float32 CPU features [N, ...].

    ``images`` are [N, C, H, W], uint8 (divided by 255) or float in [0, 1]: the models of this
    project normalise inside. Batches are moved to ``device``, where the model must already live.
    The model's training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        outputs = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
            outputs.append(model(batch).float().cpu())
        if not outputs:
            raise ValueError("no images given")
        return torch.cat(outputs)
    finally:
        model.train(was_training)

"""Losses of the encoder-stealing attacks, written as the papers state them, and where the authors'
released code computes something else, as the code does (the paper's form kept as an option).

``x`` is a batch of surrogate embeddings ``[B, d]`` and ``y`` the matching victim-side targets
``[B, d]`` (a prototype or a victim embedding); row ``i`` of each belongs to the same query sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN_EPS = 1e-8


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"expected two [B, d] batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")


def discriminate_loss(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """RDA's Discriminate term (Wu et al., ECCV 2024, eq. 3; temperature 0.07):

    ``-mean_i log( exp(x_i.y_i / t) / [ sum_{j!=i} exp(x_i.y_j / t) + sum_{j!=i} exp(x_i.x_j / t) ] )``

    The positive of ``x_i`` is its own target ``y_i``; the negatives are the other targets and the
    other surrogate embeddings of the batch. The denominator holds negatives only (not the positive,
    unlike InfoNCE). Computed with a log-sum-exp; needs a batch of at least 2.
    """
    _check_pair(x, y)
    if x.shape[0] < 2:
        raise ValueError("the Discriminate loss needs a batch of at least 2 (it has no negatives)")
    x, y = x.float(), y.float()
    positive = (x * y).sum(dim=1) / temperature
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    to_targets = (x @ y.T / temperature).masked_fill(eye, float("-inf"))
    to_surrogates = (x @ x.T / temperature).masked_fill(eye, float("-inf"))
    negatives = torch.logsumexp(torch.cat([to_targets, to_surrogates], dim=1), dim=1)
    return (negatives - positive).mean()


def align_loss(x: torch.Tensor, y: torch.Tensor, eps: float = ALIGN_EPS) -> torch.Tensor:
    """RDA's Align term (Wu et al., ECCV 2024, eq. 4):

    ``mean_i -log( (cos(x_i, y_i) + 1) / ||x_i - y_i||^2 )``

    The angle enters through the cosine in the numerator and the amplitude through the squared
    distance in the denominator. ``eps`` (1e-8, a choice of this implementation) keeps both logs
    finite when a pair coincides or points in opposite directions.
    """
    _check_pair(x, y)
    x, y = x.float(), y.float()
    cosine = F.cosine_similarity(x, y, dim=1, eps=eps)
    distance2 = (x - y).pow(2).sum(dim=1)
    return (torch.log(distance2 + eps) - torch.log(cosine + 1.0 + eps)).mean()


def rda_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    temperature: float = 0.07,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """RDA's multi-relational loss ``alpha * L_discriminate + beta * L_align`` (defaults 1 and 1)."""
    return alpha * discriminate_loss(x, y, temperature) + beta * align_loss(x, y)


def cont_steal_loss(
    surrogate: torch.Tensor,
    victim: torch.Tensor,
    temperature: float = 0.07,
    anchor: str = "victim",
) -> torch.Tensor:
    """Cont-Steal's contrastive loss (Sha et al., CVPR 2023) between L2-normalised surrogate
    embeddings ``s`` and victim embeddings ``v`` of the same samples (row ``i`` of each):

    ``-mean_i log( exp(s_i.v_i / t) / [ sum_{j!=i} exp(c_ij / t) + sum_{j!=i} exp(s_i.s_j / t) ] )``

    with the cross negatives ``c_ij = v_i.s_j`` (``anchor="victim"``) or ``s_i.v_j``
    (``anchor="surrogate"``). ``anchor="victim"`` (default) is the released form,
    ``ConStealLoss(x=v, y=s)`` of ``Con-Steal.py`` in RDA's repository (ShuchiWu/RDA): the sample's
    victim embedding against the other samples' surrogate embeddings. ``anchor="surrogate"`` pairs
    the sample's surrogate embedding with the other samples' victim embeddings: RDA's Discriminate
    term, :func:`discriminate_loss`. Both keep the surrogate-surrogate negatives ``exp(s_i.s_j / t)`` and,
    unlike InfoNCE, leave the positive out of the denominator. Computed with a log-sum-exp.
    """
    if anchor == "surrogate":
        return discriminate_loss(surrogate, victim, temperature)
    if anchor != "victim":
        raise ValueError(f"anchor must be 'victim' or 'surrogate', got {anchor!r}")
    _check_pair(surrogate, victim)
    if surrogate.shape[0] < 2:
        raise ValueError("the Cont-Steal loss needs a batch of at least 2 (it has no negatives)")
    s, v = surrogate.float(), victim.float()
    positive = (s * v).sum(dim=1) / temperature
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    cross = (v @ s.T / temperature).masked_fill(eye, float("-inf"))
    among = (s @ s.T / temperature).masked_fill(eye, float("-inf"))
    negatives = torch.logsumexp(torch.cat([cross, among], dim=1), dim=1)
    return (negatives - positive).mean()


def stolen_encoder_loss(
    clean: torch.Tensor,
    augmented: torch.Tensor,
    victim: torch.Tensor,
    aug_weight: float = 20.0,
    kind: str = "mse",
    normalize: bool = True,
) -> torch.Tensor:
    """StolenEncoder's loss (Liu et al., CCS 2022) ``d(f(x), h(x)) + aug_weight * d(f(aug(x)), h(x))``
    between the surrogate's embeddings of the clean image (``clean``) and of an augmented view
    (``augmented``) and the victim's embedding of the clean image (``victim``), all ``[B, d]``.

    ``d`` is the mean squared error over all elements (``kind="mse"``, torch's ``MSELoss``) or the
    negative cosine similarity averaged over the batch (``kind="cosine"``). With ``normalize`` (the
    default) all three are L2-normalised first, as ``StolenEncoder.py`` in RDA's repository does
    (``F.normalize`` on both surrogate embeddings; the victim's at extraction); without it the MSE
    is on the raw embeddings (this project's earlier form). The cosine ignores ``normalize``.
    """
    _check_pair(clean, victim)
    _check_pair(augmented, victim)
    z_clean, z_aug, y = clean.float(), augmented.float(), victim.float()
    if normalize:
        z_clean, z_aug, y = F.normalize(z_clean, dim=1), F.normalize(z_aug, dim=1), F.normalize(y, dim=1)
    if kind == "mse":
        return F.mse_loss(z_clean, y) + aug_weight * F.mse_loss(z_aug, y)
    if kind == "cosine":
        clean_term = -F.cosine_similarity(z_clean, y, dim=1).mean()
        return clean_term - aug_weight * F.cosine_similarity(z_aug, y, dim=1).mean()
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")

"""Losses of the encoder-stealing attacks, written as the papers state them.

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

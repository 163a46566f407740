"""The attacker's best alternative without a single query: its surrogate architecture trained
self-supervised (SimCLR, Chen et al., ICML 2020; NT-Xent, temperature 0.5, the SimCLR augmentations)
on the attacker's own query pool, with the compute one attack gets (the same optimiser, learning
rate, batch size and number of steps).

A stolen encoder is worth what it adds over this: the *stealing gain* (surrogate minus no-query
alternative on a downstream task) and the *share of the victim's gain recovered*
(``(surrogate - no-query) / (victim - no-query)``). A victim whose own downstream score is not
clearly above this alternative leaves nothing to steal, whatever the attack scores.
"""

from __future__ import annotations

import torch

from attacker_client.attacks.contract import SURROGATE_MEAN, SURROGATE_STD
from common.datasets import ImageData
from common.models import Encoder, build_model
from common.training import TrainConfig, train_simclr
from common.views import ViewConfig, ViewGenerator

SIMCLR_TEMPERATURE = 0.5


def train_no_query_alternative(
    pool: ImageData,
    architecture: str,
    feature_dim: int,
    train: TrainConfig,
    progress: bool | None = None,
) -> Encoder:
    """A fresh ``architecture`` encoder of width ``feature_dim`` (seeded by ``train.seed``) trained
    with SimCLR on ``pool`` for ``train``'s steps; no victim query is made."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        model = build_model(
            "encoder",
            architecture,
            pool.channels,
            [SURROGATE_MEAN] * pool.channels,
            [SURROGATE_STD] * pool.channels,
            feature_dim=feature_dim,
        )
    assert isinstance(model, Encoder)
    train_simclr(
        model, pool, train, ViewGenerator(ViewConfig.simclr()), SIMCLR_TEMPERATURE, progress=progress
    )
    return model.eval()

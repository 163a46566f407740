"""MC dropout (Gal & Ghahramani, ICML 2016) as ensemble stealing members.

One surrogate is trained with dropout of rate ``p`` (default 0.5, the paper's rate for fully
connected layers) on its penultimate features, just before the linear head (the common choice for
CNNs, where dropout sits before the last layer(s)). At prediction ``M`` dropout masks are drawn;
each fixed mask is one possible surrogate: a plain classifier whose head weights are the trained
ones times ``mask / (1 - p)`` (inverted dropout), so members can be saved and served like any
classifier. Masks are drawn from a generator seeded by (seed, member).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field

from attacker_client.uq.base import UQ_METHODS, Monitor, UQMethod, UQParams
from common.models import Classifier

if TYPE_CHECKING:
    from attacker_client.attacks.classifier import ClassifierAttack, TransferSet


class MCDropoutParams(UQParams):
    """MC dropout's rate."""

    p: float = Field(0.5, gt=0, lt=1, description="dropout rate on the penultimate features")


def masked_member(model: Classifier, mask: torch.Tensor, p: float) -> Classifier:
    """``model`` with one dropout mask over its head's inputs folded into the head's weights."""
    member = copy.deepcopy(model)
    with torch.no_grad():
        member.head.weight.mul_(mask.to(member.head.weight.device).unsqueeze(0) / (1 - p))
    return member


@UQ_METHODS.register
class MCDropout(UQMethod):
    """Dropout at training and at prediction; each mask one member."""

    name = "mc_dropout"
    paper = "Gal & Ghahramani, ICML 2016"
    Params = MCDropoutParams
    params: MCDropoutParams

    model: Classifier | None = None

    def train(
        self,
        attack: ClassifierAttack,
        data: TransferSet,
        members: int,
        device: torch.device,
        monitor: Monitor | None,
        progress: bool | None,
    ) -> Classifier:
        p = self.params.p
        self.model = attack.surrogate_for(data)

        def logits(model: Classifier, x: torch.Tensor) -> torch.Tensor:
            return model.head(F.dropout(model.features(x), p, training=True))

        hook = self.step_recorder(
            attack, data, monitor, lambda: self.sample_members(members, attack.params.seed)
        )
        attack.fit(self.model, data, device, logits_fn=logits, on_step=hook, progress=progress)
        return self.model

    def sample_members(self, members: int, seed: int) -> list[Classifier]:
        if self.model is None:
            raise RuntimeError("train first")
        generator = torch.Generator().manual_seed(seed)
        width = self.model.head.in_features
        masks = (torch.rand(members, width, generator=generator) >= self.params.p).float()
        return [masked_member(self.model, mask, self.params.p) for mask in masks]

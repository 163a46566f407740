"""Bayes-by-backprop (Blundell et al., ICML 2015) as ensemble stealing members.

Mean-field Gaussian variational posterior ``q(w) = N(μ, softplus(ρ)²)`` over every trainable
weight of the surrogate (``scope="all"``, the paper's setting) or over its linear head only
(``scope="head"``), trained by the reparameterisation trick with one weight sample per step and the
minibatch ELBO: the distillation loss plus ``kl_weight * KL(q || p) / N`` (N the transfer-set size;
``kl_weight = 1`` is the paper's per-example weighting). The default ``kl_weight`` is 0.01, a
tempered ELBO: with ~10⁵-10⁶ weights and a few thousand queries the full KL drives ``q`` to the
prior (measured on the tiny synthetic test victim: agreement 0.1, chance, at ``kl_weight = 1``;
1.0 at 0.01). The prior is ``N(0, prior_sigma²)`` (default 0.1; the paper's scale mixture is not
used), ``σ`` starts at ``init_sigma`` (0.01).
``μ`` lives in the surrogate's own parameters, so the surrogate *is* the posterior mean;
a member is one weight sample from ``q``.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from attacker_client.uq.base import UQ_METHODS, Monitor, UQMethod, UQParams
from common.models import Classifier

if TYPE_CHECKING:
    from attacker_client.attacks.classifier import ClassifierAttack, TransferSet


class BBBParams(UQParams):
    """Bayes-by-backprop's prior, initial spread, KL weight and scope."""

    prior_sigma: float = Field(0.1, gt=0, description="standard deviation of the Gaussian prior")
    init_sigma: float = Field(0.01, gt=0, description="initial posterior standard deviation")
    kl_weight: float = Field(0.01, ge=0, description="multiplies KL / N (1: the full ELBO)")
    scope: Literal["all", "head"] = Field("all", description="which weights are variational")


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """``KL(N(μ, σ²) || N(0, s²))`` summed over elements: ``log(s/σ) + (σ² + μ²) / (2 s²) - 1/2``."""
    return (
        math.log(prior_sigma) - sigma.log() + (sigma.square() + mu.square()) / (2 * prior_sigma**2) - 0.5
    ).sum()


@UQ_METHODS.register
class BayesByBackprop(UQMethod):
    """Mean-field variational weights; each weight sample one member."""

    name = "bbb"
    paper = "Blundell et al., ICML 2015"
    Params = BBBParams
    params: BBBParams
    model: Classifier | None = None
    rho: dict[str, torch.nn.Parameter] | None = None

    def variational_names(self, model: Classifier) -> list[str]:
        """Names of the parameters with a variational posterior."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return names if self.params.scope == "all" else [n for n in names if n.startswith("head.")]

    def train(
        self,
        attack: ClassifierAttack,
        data: TransferSet,
        members: int,
        device: torch.device,
        monitor: Monitor | None,
        progress: bool | None,
    ) -> Classifier:
        self.model = model = attack.surrogate_for(data)
        model.to(device)
        mus = dict(model.named_parameters())
        names = self.variational_names(model)
        rho0 = math.log(math.expm1(self.params.init_sigma))
        self.rho = rho = {n: torch.nn.Parameter(torch.full_like(mus[n], rho0)) for n in names}
        weight = self.params.kl_weight / len(data)
        sample_generator = torch.Generator(device=device).manual_seed(attack.params.seed + 17)

        def sampled(x_model: Classifier, x: torch.Tensor) -> torch.Tensor:
            weights = {
                n: mus[n]
                + F.softplus(rho[n]) * torch.randn(mus[n].shape, generator=sample_generator, device=device)
                for n in names
            }
            return functional_call(x_model, weights, (x,), strict=False)

        def kl() -> torch.Tensor:
            return weight * sum(
                (gaussian_kl(mus[n], F.softplus(rho[n]), self.params.prior_sigma) for n in names),
                torch.zeros((), device=device),
            )

        hook = self.step_recorder(
            attack, data, monitor, lambda: self.sample_members(members, attack.params.seed)
        )
        attack.fit(
            model,
            data,
            device,
            logits_fn=sampled,
            extra_loss=kl,
            # The KL term is the prior: no weight decay on μ, and none on ρ (it would pull σ to 0.69).
            params=[
                {"params": list(model.parameters()), "weight_decay": 0.0},
                {"params": list(rho.values()), "weight_decay": 0.0},
            ],
            on_step=hook,
            progress=progress,
        )
        return model

    def sigmas(self) -> dict[str, torch.Tensor]:
        """The posterior standard deviation of every variational parameter."""
        if self.rho is None:
            raise RuntimeError("train first")
        return {n: F.softplus(r.detach()) for n, r in self.rho.items()}

    def summary(self) -> dict[str, float]:
        if self.rho is None:
            return {}
        sigmas = torch.cat([s.flatten() for s in self.sigmas().values()])
        return {"mean_sigma": float(sigmas.mean()), "max_sigma": float(sigmas.max())}

    def sample_members(self, members: int, seed: int) -> list[Classifier]:
        if self.model is None:
            raise RuntimeError("train first")
        generator = torch.Generator().manual_seed(seed)
        sigmas = self.sigmas()
        out = []
        for _ in range(members):
            member = copy.deepcopy(self.model)
            params = dict(member.named_parameters())
            with torch.no_grad():
                for n, sigma in sigmas.items():
                    noise = torch.randn(sigma.shape, generator=generator).to(sigma.device)
                    params[n].add_(sigma * noise)
            out.append(member)
        return out

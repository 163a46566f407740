"""SWAG, SWA-Gaussian (Maddox et al., NeurIPS 2019), as ensemble stealing members.

The surrogate trains as usual; after ``start`` (default: half) of its steps the weights are
collected once per epoch (the paper's schedule; ``collect_every`` steps when set, for runs of few
epochs) into a running mean
``θ_SWA``, a running second moment (diagonal variance ``Σ_diag = mean(θ²) - θ_SWA²``) and the last
``max_rank`` (default 20, the paper's K) deviations ``D = [θ_i - θ_SWA]``. A member is a sample

    θ = θ_SWA + sqrt(scale) * ( Σ_diag^{1/2} z₁ / sqrt(2) + D z₂ / sqrt(2 (K - 1)) ),

z₁, z₂ standard normal, ``scale`` 0.5 as in the paper's experiments; after sampling, BatchNorm
statistics are recomputed on (up to ``bn_images``) transfer-set images, as SWA/SWAG require.
Only trainable parameters are sampled. The learning rate keeps the attack's schedule during
collection (set the attack's ``lr_step`` to null for the paper's constant SWA learning rate).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from attacker_client.uq.base import UQ_METHODS, Monitor, UQMethod, UQParams
from common.models import Classifier

if TYPE_CHECKING:
    from attacker_client.attacks.classifier import ClassifierAttack, TransferSet


class SWAGParams(UQParams):
    """SWAG's collection and sampling settings."""

    start: float = Field(0.5, ge=0, lt=1, description="fraction of the steps before collection starts")
    collect_every: int | None = Field(
        None, ge=1, description="steps between snapshots (null: one per epoch, the paper's)"
    )
    max_rank: int = Field(20, ge=2, description="K: deviations kept for the low-rank covariance")
    scale: float = Field(0.5, gt=0, description="covariance scale of the samples")
    bn_images: int = Field(2048, ge=1, description="transfer-set images to recompute BatchNorm on")


class SWAGPosterior:
    """Running moments of the collected weight vectors, and samples from the Gaussian they define."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.sq_mean: torch.Tensor | None = None
        self.deviations: list[torch.Tensor] = []

    def collect(self, theta: torch.Tensor) -> None:
        """Add one weight vector (the paper's Algorithm 1 update)."""
        theta = theta.detach().double().cpu()
        self.count += 1
        if self.mean is None or self.sq_mean is None:
            self.mean, self.sq_mean = theta.clone(), theta.square()
        else:
            self.mean += (theta - self.mean) / self.count
            self.sq_mean += (theta.square() - self.sq_mean) / self.count
        self.deviations = [*self.deviations, theta - self.mean][-self.max_rank :]

    def sample(self, generator: torch.Generator, scale: float) -> torch.Tensor:
        """One weight vector θ (see the module docstring); the mean alone with fewer than 2 snapshots."""
        if self.mean is None or self.sq_mean is None:
            raise RuntimeError("nothing collected yet")
        if self.count < 2:
            return self.mean.float()
        variance = (self.sq_mean - self.mean.square()).clamp_min(1e-30)
        z1 = torch.randn(self.mean.shape, generator=generator, dtype=torch.float64)
        theta = variance.sqrt() * z1 / math.sqrt(2)
        k = len(self.deviations)
        if k >= 2:
            z2 = torch.randn(k, generator=generator, dtype=torch.float64)
            theta += torch.stack(self.deviations, dim=1) @ z2 / math.sqrt(2 * (k - 1))
        return (self.mean + math.sqrt(scale) * theta).float()


@torch.no_grad()
def recompute_batchnorm(model: Classifier, images: torch.Tensor, batch_size: int = 256) -> None:
    """Reset and re-estimate every BatchNorm's running statistics on uint8 ``images`` (cumulative
    average, as ``torch.optim.swa_utils.update_bn``)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size].to(device).float() / 255.0)
    for m in norms:
        m.momentum = momenta[m]
    model.train(was_training)


@UQ_METHODS.register
class SWAG(UQMethod):
    """Gaussian over weights from the SGD trajectory (diagonal + low rank)."""

    name = "swag"
    paper = "Maddox et al., NeurIPS 2019"
    Params = SWAGParams
    params: SWAGParams
    model: Classifier | None = None
    posterior: SWAGPosterior | None = None
    bn_images: torch.Tensor | None = None

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
        self.posterior = posterior = SWAGPosterior(self.params.max_rank)
        self.bn_images = data.images[: self.params.bn_images]
        per_epoch = attack.params.steps_per_epoch(len(data))
        start = math.floor(self.params.start * attack.params.total_steps(len(data)))
        every = self.params.collect_every or per_epoch
        record = self.step_recorder(
            attack,
            data,
            monitor,
            lambda: self.sample_members(members, attack.params.seed) if posterior.count else [model],
        )

        def hook(done: int) -> None:
            if done >= start and done % every == 0:
                posterior.collect(parameters_to_vector(model.parameters()))
            record(done)

        attack.fit(model, data, device, on_step=hook, progress=progress)
        if posterior.count == 0:  # too few steps to collect: keep the last weights
            posterior.collect(parameters_to_vector(model.parameters()))
        return self.mean_model()

    def summary(self) -> dict[str, Any]:
        return {} if self.posterior is None else {"snapshots": self.posterior.count}

    def _with_weights(self, theta: torch.Tensor) -> Classifier:
        if self.model is None or self.bn_images is None:
            raise RuntimeError("train first")
        member = copy.deepcopy(self.model)
        vector_to_parameters(theta.to(next(member.parameters()).device), member.parameters())
        recompute_batchnorm(member, self.bn_images)
        return member

    def mean_model(self) -> Classifier:
        """The SWA solution θ_SWA (with its BatchNorm statistics)."""
        if self.posterior is None or self.posterior.mean is None:
            raise RuntimeError("train first")
        return self._with_weights(self.posterior.mean.float())

    def sample_members(self, members: int, seed: int) -> list[Classifier]:
        if self.posterior is None:
            raise RuntimeError("train first")
        generator = torch.Generator().manual_seed(seed)
        return [
            self._with_weights(self.posterior.sample(generator, self.params.scale)) for _ in range(members)
        ]

"""Ensemble stealing with uncertainty quantification (Pape et al., ESANN 2023, "On the Limitations
of Model Stealing with Uncertainty Quantification Models").

The transfer set is queried once (as Knockoff Nets does); a UQ method (:mod:`attacker_client.uq`:
``deep_ensemble``, ``mc_dropout``, ``swag``, ``bbb``, ``laplace``) turns it into ``members``
possible surrogates, whose mean probability is the stolen model. The members' prediction variance
and agreement are logged on held-out monitor images during training. The paper reports only
marginal gains in agreement over a single surrogate and low diversity among members; the range
measures both rather than assuming either.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field, model_validator

from attacker_client.attacks.classifier import (
    ClassifierAttack,
    ClassifierAttackParams,
    ClassifierOracle,
    ClassifierStealingResult,
)
from attacker_client.attacks.contract import ATTACKS
from attacker_client.uq import UQ_METHODS, Monitor
from common.datasets import ImageData


class EnsembleParams(ClassifierAttackParams):
    """The UQ method, the number of members and the method's own parameters."""

    method: str = Field("deep_ensemble", description=f"one of {', '.join(UQ_METHODS.names())}")
    members: int = Field(5, ge=2, le=100, description="members (networks or posterior samples)")
    method_params: dict[str, Any] = Field(default_factory=dict, description="the UQ method's parameters")

    @model_validator(mode="after")
    def _check_method(self) -> EnsembleParams:
        UQ_METHODS.build(self.method, self.method_params)  # unknown names and bad values fail here
        return self


@ATTACKS.register
class EnsembleStealing(ClassifierAttack):
    """``members`` surrogates from one UQ method, queries paid once."""

    name = "ensemble"
    paper = "Pape et al., ESANN 2023"
    Params = EnsembleParams
    params: EnsembleParams

    def steal(
        self,
        oracle: ClassifierOracle,
        pool: ImageData,
        budget: int,
        device: torch.device,
        progress: bool | None = None,
        monitor: Monitor | None = None,
    ) -> ClassifierStealingResult:
        p = self.params
        started = time.perf_counter()
        samples = self.choose_samples(pool, budget)
        data = self.query(oracle, samples)
        query_seconds = time.perf_counter() - started
        method = UQ_METHODS.build(p.method, p.method_params)
        started = time.perf_counter()
        single = method.train(self, data, p.members, device, monitor, progress)
        members = method.sample_members(p.members, p.seed)
        return ClassifierStealingResult(
            members=[m.cpu() for m in members],
            single=single.cpu(),
            history=[],
            samples=len(samples),
            queries=len(samples),
            query_seconds=query_seconds,
            train_seconds=time.perf_counter() - started,
            monitor=monitor.rows if monitor is not None else [],
            extra={
                "output": oracle.mode,
                "method": p.method,
                "method_paper": method.paper,
                "method_summary": method.summary(),
            },
        )

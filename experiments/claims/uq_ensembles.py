"""Claim of Pape et al. (ESANN 2023, "On the Limitations of Model Stealing with Uncertainty
Quantification Models", arXiv 2305.05293): combining several possible surrogates brings only
marginal gains in label agreement with the victim, and the members' predictions are alike
(low diversity, falling over training).

Measured as the range measures it (``benchmarks/steal_classifiers.py``, README "Classifier
stealing"), at one budget, in-process (no HTTP: the oracle answers the victim's probabilities as the
API's ``probabilities`` mode does):

- victim: the quick ``fmnist-classifier`` (:func:`victims.recipes.recipe_for`), trained into the
  model store on first use; the attacker's pool is the Fashion-MNIST training half the victim never
  saw; agreement is scored on the first ``test_size`` test images against the white-box victim;
- treatment: the deep ensemble (``ensemble`` attack, ``deep_ensemble``, ``members`` networks, one
  transfer set paid once): agreement of the members' mean probabilities;
- reference: one Knockoff KD surrogate on the same transfer set. It is the ensemble's first member:
  the attack's seed chooses the transfer set, member 0 is initialised and shuffled with that same
  seed, so it *is* the ``knockoff`` surrogate of that seed (same transfer set, init, data order and
  optimiser; bit-identical on the CPU) and is not trained twice;
- extras: both arms' accuracy, the members' final prediction variance and pairwise disagreement
  (:func:`attacker_client.uq.base.diversity`), the variance at the first and the last logged step
  (the paper's "variance over training iterations"), the members' mean agreement, the victim's
  accuracy.

Defaults (``full``): 5,000 queries, 5 members, 300 SGD steps of 64 per network (lr 0.02, momentum
0.9, constant lr), monitor every 30 steps on 500 test images, 2,000 test images: the README's
benchmark at its middle budget. The claim is "treatment higher than reference" in direction; the
diagnosis says whether the gain is marginal (its whole interval within ``marginal``, 2 points).

Time (estimated from a measured ~1.1 ms per training image on 2 cores): about 2.2 min a seed
(5 x 300 x 64 training images, monitoring, evaluation), plus 2-3 min once to train the victim when
the store lacks it (shared with ``ast_kd``).
"""

from __future__ import annotations

import time
from typing import ClassVar

import torch
from pydantic import Field

from attacker_client.attacks.ensemble import EnsembleStealing
from attacker_client.evaluate_classifier import evaluate_classifier_stealing
from attacker_client.uq import Monitor
from attacker_client.uq.base import member_probabilities
from experiments.claims.base import CLAIMS, Claim, ClaimParams, ClaimRow, Measurement, Size, interval_points
from experiments.claims.shared import (
    CI_DATASET,
    classifier_recipe,
    probabilities_oracle,
    trained_classifier,
    victim_splits,
)
from victims.recipes import VictimRecipe


class UQClaimParams(ClaimParams):
    """The deep-ensemble stealing run (``full`` defaults; see the module docstring)."""

    dataset: str = Field("fashion_mnist", description="the victim's data set (ci: synthetic)")
    budget: int = Field(5000, ge=2, description="queries: one transfer set, paid once")
    members: int = Field(5, ge=2, description="deep-ensemble members")
    steps: int = Field(300, ge=1, description="SGD steps per network")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    monitor_every: int = Field(30, ge=1, description="steps between logs of the members' predictions")
    monitor_size: int = Field(500, ge=2, description="test images the members are logged on")
    test_size: int = Field(2000, ge=10, description="test images agreement is scored on")
    marginal: float = Field(0.02, gt=0, description="a gain whose interval stays below this is marginal")


@CLAIMS.register
class UQEnsembles(Claim):
    """A deep ensemble of stolen surrogates vs one KD surrogate: agreement with the victim."""

    name = "uq_ensembles"
    paper = (
        "Pape et al., ESANN 2023 (On the Limitations of Model Stealing with Uncertainty "
        "Quantification Models)"
    )
    figure = (
        "combining the possible surrogates of five UQ models gives only marginal gains in label "
        "agreement over a single surrogate; the members' prediction variance is low and falls over training"
    )
    metric = "agreement with the victim (argmax) on held-out test images of its data set"
    treatment = "deep ensemble (mean of the members' probabilities)"
    reference = "one KD surrogate (Knockoff, the same transfer set)"
    direction = "higher"
    Params = UQClaimParams
    ci: ClassVar[dict[str, object]] = {
        "dataset": CI_DATASET,
        "budget": 64,
        "members": 3,
        "steps": 4,
        "batch_size": 16,
        "monitor_every": 2,
        "monitor_size": 32,
        "test_size": 100,
    }
    full_minutes = 2.2
    params: UQClaimParams

    def victims(self, size: Size) -> list[VictimRecipe]:
        return [classifier_recipe(self.settings(size).dataset)]

    def measure(self, seed: int, size: Size) -> Measurement:
        started = time.perf_counter()
        p: UQClaimParams = self.settings(size)
        recipe = classifier_recipe(p.dataset)
        victim = trained_classifier(recipe, self.store)
        splits = victim_splits(recipe)
        test = splits.eval.subset(torch.arange(min(p.test_size, len(splits.eval))))
        monitor_images = test.images[: p.monitor_size]
        monitor = Monitor(monitor_images, member_probabilities([victim], monitor_images)[0].argmax(dim=1))
        attack = EnsembleStealing(
            {
                "method": "deep_ensemble",
                "members": p.members,
                "epochs": 10_000,
                "max_steps": p.steps,
                "batch_size": p.batch_size,
                "lr": p.lr,
                "momentum": p.momentum,
                "lr_step": None,
                "monitor_every": p.monitor_every,
                "seed": seed,
            }
        )
        result = attack.steal(
            probabilities_oracle(victim), splits.attacker_pool, p.budget, self.device, False, monitor
        )
        evaluation = evaluate_classifier_stealing(
            result.members, result.single, test.images, test.labels, victim, self.device
        )
        combined, single = evaluation.combined, evaluation.single
        assert combined.agreement is not None and single.agreement is not None
        member_agreement = [m.agreement for m in evaluation.members if m.agreement is not None]
        rows = result.monitor
        return self.measurement(
            seed,
            size,
            combined.agreement,
            single.agreement,
            started,
            treatment_accuracy=combined.accuracy,
            reference_accuracy=single.accuracy,
            member_agreement=sum(member_agreement) / len(member_agreement),
            variance=evaluation.diversity.variance,
            disagreement=evaluation.diversity.disagreement,
            variance_first=float(rows[0]["variance"]) if rows else float("nan"),
            variance_last=float(rows[-1]["variance"]) if rows else float("nan"),
            victim_accuracy=evaluation.victim.accuracy if evaluation.victim is not None else float("nan"),
            queries=float(result.queries),
        )

    def diagnose(self, row: ClaimRow) -> str:
        p = UQClaimParams.model_validate(row.params)
        gain = row.difference
        marginal = (
            gain is not None
            and gain.low is not None
            and gain.high is not None
            and max(abs(gain.low), abs(gain.high)) < p.marginal
        )
        size = (
            f"marginal (its interval stays below {100 * p.marginal:.0f} points)"
            if marginal
            else f"not shown marginal (interval not within {100 * p.marginal:.0f} points)"
        )
        trend = "falls" if row.mean("variance_last") < row.mean("variance_first") else "does not fall"
        return (
            f"{p.members} members gain {interval_points(gain)} points of agreement over one KD surrogate "
            f"at {p.budget:,} queries and {p.steps} steps: {size}; members disagree on "
            f"{100 * row.mean('disagreement'):.1f} % of test images, variance {row.mean('variance'):.4f}, "
            f"which {trend} over training "
            f"({row.mean('variance_first'):.4f} -> {row.mean('variance_last'):.4f})"
        )

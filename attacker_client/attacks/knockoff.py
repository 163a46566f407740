"""Knockoff Nets (Orekondy et al., CVPR 2019): knowledge-distillation stealing of a classifier.

The attacker queries a transfer set drawn from its own pool (``sampling``: random, the paper's
default, or balanced over the pool's own labels) once, and trains one surrogate on the victim's
answers: soft labels with a temperature when the key gets probabilities (or a top-k truncated
posterior), hard labels when it gets labels only (see :mod:`attacker_client.attacks.classifier`).
The paper's adaptive (bandit) sampling is not implemented. Training defaults are the released
code's: SGD lr 0.01, momentum 0.5, batch 64, 100 epochs, lr / 10 at epoch 60.
"""

from __future__ import annotations

import time

import torch

from attacker_client.attacks.classifier import (
    ClassifierAttack,
    ClassifierOracle,
    ClassifierStealingResult,
)
from attacker_client.attacks.contract import ATTACKS
from attacker_client.uq.base import Monitor, member_probabilities
from common.datasets import ImageData


@ATTACKS.register
class Knockoff(ClassifierAttack):
    """One surrogate distilled from the victim's answers on a transfer set queried once."""

    name = "knockoff"
    paper = "Orekondy et al., CVPR 2019 (Knockoff Nets)"

    def steal(
        self,
        oracle: ClassifierOracle,
        pool: ImageData,
        budget: int,
        device: torch.device,
        progress: bool | None = None,
        monitor: Monitor | None = None,
    ) -> ClassifierStealingResult:
        started = time.perf_counter()
        samples = self.choose_samples(pool, budget)
        data = self.query(oracle, samples)
        query_seconds = time.perf_counter() - started
        model = self.build_surrogate(samples.channels, oracle.num_classes)
        per_epoch = self.params.steps_per_epoch(len(data))

        def hook(done: int) -> None:
            if monitor is not None and self.params.is_monitor_step(done, len(data)):
                monitor.record(done, done / per_epoch, member_probabilities([model], monitor.images))

        started = time.perf_counter()
        history = self.fit(model, data, device, on_step=hook, progress=progress)
        model.cpu()
        return ClassifierStealingResult(
            members=[model],
            single=model,
            history=history,
            samples=len(samples),
            queries=len(samples),
            query_seconds=query_seconds,
            train_seconds=time.perf_counter() - started,
            monitor=monitor.rows if monitor is not None else [],
            extra={"output": oracle.mode},
        )

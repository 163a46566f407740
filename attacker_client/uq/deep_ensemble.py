"""Deep ensembles (Lakshminarayanan et al., NeurIPS 2017) as ensemble stealing members.

``M`` surrogates trained independently on the same transfer set (queries paid once): each member
has its own random initialisation and its own data order (seeds ``seed + 1000 m``); no
adversarial training (the paper's optional extra). Members are spread over the available CUDA
devices when there are several (one thread per device), else trained one after another.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from attacker_client.uq.base import UQ_METHODS, Monitor, UQMethod, member_probabilities
from common.models import Classifier

if TYPE_CHECKING:
    from attacker_client.attacks.classifier import ClassifierAttack, TransferSet

SEED_STRIDE = 1000


def member_devices(device: torch.device, members: int) -> list[torch.device]:
    """The device of each member: round-robin over every CUDA device when ``device`` is CUDA without
    an index and several are present, else ``device`` for all."""
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        count = torch.cuda.device_count()
        return [torch.device("cuda", m % count) for m in range(members)]
    return [device] * members


@UQ_METHODS.register
class DeepEnsemble(UQMethod):
    """``M`` independently trained surrogates."""

    name = "deep_ensemble"
    paper = "Lakshminarayanan et al., NeurIPS 2017"

    trained: tuple[Classifier, ...] = ()

    def train(
        self,
        attack: ClassifierAttack,
        data: TransferSet,
        members: int,
        device: torch.device,
        monitor: Monitor | None,
        progress: bool | None,
    ) -> Classifier:
        seed = attack.params.seed
        models = [attack.surrogate_for(data, seed + SEED_STRIDE * m) for m in range(members)]
        devices = member_devices(device, members)
        snapshots: list[list[torch.Tensor]] = [[] for _ in range(members)]
        marks: list[int] = []

        def train_member(m: int) -> None:
            def hook(done: int) -> None:
                if monitor is not None and attack.params.is_monitor_step(done, len(data)):
                    snapshots[m].append(member_probabilities([models[m]], monitor.images)[0])
                    if m == 0:
                        marks.append(done)

            attack.fit(
                models[m],
                data,
                devices[m],
                seed=seed + SEED_STRIDE * m,
                on_step=hook,
                progress=progress,
                description=f"{attack.name} member {m + 1}/{members}",
            )

        if len(set(devices)) > 1:
            with ThreadPoolExecutor(len(set(devices))) as pool:
                list(pool.map(train_member, range(members)))
        else:
            for m in range(members):
                train_member(m)
        if monitor is not None:
            per_epoch = attack.params.steps_per_epoch(len(data))
            for i, done in enumerate(marks):
                monitor.record(done, done / per_epoch, torch.stack([s[i] for s in snapshots]))
        self.trained = tuple(model.to(device) for model in models)
        return self.trained[0]

    def sample_members(self, members: int, seed: int) -> list[Classifier]:
        if members > len(self.trained):
            raise ValueError(f"{len(self.trained)} members were trained, {members} asked for")
        return list(self.trained[:members])

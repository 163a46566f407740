"""The contract of an uncertainty-quantification (UQ) method for ensemble stealing, and its registry
(:data:`UQ_METHODS`).

Pape et al. (ESANN 2023, "On the Limitations of Model Stealing with Uncertainty Quantification
Models") steal a classifier with several *possible surrogate networks* and combine their
predictions. Here every UQ method trains on one transfer set (the queries are paid once, whatever
the number of members) and then *realises* ``M`` members as plain classifiers: independent
networks (deep ensembles), fixed dropout masks folded into the head (MC dropout), weight samples
from a Gaussian posterior (SWAG, Bayes-by-backprop, last-layer Laplace). The stolen model is the
mean of the members' probabilities.

While training, each method logs the members' predictions on held-out monitor images (no queries
are spent on them) every ``monitor_every`` steps (default: every epoch); :class:`Monitor` turns
them into the prediction variance across members, their pairwise disagreement and, when the
victim's labels of the monitor images are known (a white-box reference), each member's and the
combination's agreement with the victim: the paper's "variance over training iterations".
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from common.models import Classifier
from common.registry import Configurable, Params, Registry

if TYPE_CHECKING:
    from attacker_client.attacks.classifier import ClassifierAttack, TransferSet

PREDICT_BATCH = 512


@torch.no_grad()
def member_probabilities(
    members: list[Classifier], images: torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """Softmax outputs of every member on uint8 images: ``[M, n, classes]`` (float32, on the CPU).

    Members are put in eval mode for the pass and restored to their previous mode afterwards.
    """
    outputs = []
    for model in members:
        was_training = model.training
        model.eval()
        model_device = device or next(model.parameters()).device
        rows = [
            torch.softmax(
                model(images[s : s + PREDICT_BATCH].to(model_device).float() / 255.0).float(), 1
            ).cpu()
            for s in range(0, len(images), PREDICT_BATCH)
        ]
        outputs.append(torch.cat(rows) if rows else torch.zeros(0, 0))
        model.train(was_training)
    return torch.stack(outputs)


def diversity(probs: torch.Tensor, reference: torch.Tensor | None = None) -> dict[str, Any]:
    """Diversity of members' predictions ``[M, n, C]``.

    - ``variance``: mean over images and classes of the variance across members (population, /M);
    - ``disagreement``: mean over member pairs of the share of images whose argmax differs;
    - with ``reference`` labels ``[n]`` (the victim's): ``member_agreement`` (each member's share of
      argmax equal to the reference), ``combined_agreement`` (of the mean probabilities).
    """
    members = probs.shape[0]
    labels = probs.argmax(dim=2)
    pairs = list(itertools.combinations(range(members), 2))
    row: dict[str, Any] = {
        "members": members,
        "variance": float(probs.var(dim=0, unbiased=False).mean()) if members > 1 else 0.0,
        "disagreement": (
            sum(float((labels[a] != labels[b]).double().mean()) for a, b in pairs) / len(pairs)
            if pairs
            else 0.0
        ),
    }
    if reference is not None:
        row["member_agreement"] = [float((labels[m] == reference).double().mean()) for m in range(members)]
        row["combined_agreement"] = float((probs.mean(dim=0).argmax(dim=1) == reference).double().mean())
    return row


@dataclass
class Monitor:
    """Held-out images on which members' predictions are logged during training."""

    images: torch.Tensor  # uint8 [n, C, H, W]
    reference: torch.Tensor | None = None  # the victim's labels of them, when known
    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(self, iteration: int, epoch: float, probs: torch.Tensor, **extra: Any) -> None:
        """Log members' probabilities ``[M, n, C]`` at ``iteration`` (optimizer steps so far; ``epoch``:
        the epochs they make)."""
        self.rows.append(
            {"iteration": iteration, "epoch": epoch, **diversity(probs, self.reference), **extra}
        )


class UQParams(Params):
    """Parameters of a UQ method (each method adds its own)."""


class UQMethod(Configurable, abc.ABC):
    """A way to get ``members`` possible surrogates out of one transfer set (parameters declared in
    :attr:`Params`, checked at construction)."""

    Params: ClassVar[type[UQParams]] = UQParams

    @abc.abstractmethod
    def train(
        self,
        attack: ClassifierAttack,
        data: TransferSet,
        members: int,
        device: torch.device,
        monitor: Monitor | None,
        progress: bool | None,
    ) -> Classifier:
        """Train on the transfer set; returns the method's single network (the deterministic mean:
        the first deep-ensemble member, the dropout-free net, the SWA mean, the posterior mean, the
        MAP). ``members`` may be used for monitoring during training."""

    @abc.abstractmethod
    def sample_members(self, members: int, seed: int) -> list[Classifier]:
        """``members`` plain classifiers realising the method's possible surrogates (seeded)."""

    def summary(self) -> dict[str, Any]:
        """What the fit found that a reader wants to see (a tuned prior, a snapshot count)."""
        return {}

    @staticmethod
    def step_recorder(
        attack: ClassifierAttack,
        data: TransferSet,
        monitor: Monitor | None,
        realise: Callable[[], list[Classifier]],
    ) -> Callable[[int], None]:
        """An ``on_step`` hook logging ``realise()`` (the members now) on the monitor at the attack's
        monitor steps (:meth:`ClassifierAttackParams.is_monitor_step`)."""
        per_epoch = attack.params.steps_per_epoch(len(data))

        def hook(done: int) -> None:
            if monitor is not None and attack.params.is_monitor_step(done, len(data)):
                monitor.record(done, done / per_epoch, member_probabilities(realise(), monitor.images))

        return hook


# Every UQ method by name: ``@UQ_METHODS.register``; ``UQ_METHODS.build("swag", {...})``.
UQ_METHODS = Registry[type[UQMethod]]("UQ method")

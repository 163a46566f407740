"""The contract of a paper's claim that ``stealrange claims`` checks (issue 18), and the rule that
turns its per-seed numbers into a verdict.

A claim (:class:`Claim`, a :class:`common.registry.Configurable` filed in :data:`CLAIMS`) names its
paper, the paper's figure (as text), what is measured (:attr:`Claim.metric`), the two arms it
compares (:attr:`Claim.treatment` and :attr:`Claim.reference`) and the direction the paper claims
(:attr:`Claim.direction`: the treatment ``lower`` or ``higher`` than the reference). It implements
:meth:`Claim.measure` ``(seed, size) -> Measurement``: one seed's number for the treatment, one for
the reference and any extra numbers its diagnosis reads, at one of two sizes:

- ``full``: the fair small-scale try of issue 18 (the claim's :attr:`~Claim.Params` defaults), all
  claims together within 60 minutes on 2 CPU cores;
- ``ci``: seconds, on the synthetic data set and tiny models (the :attr:`~Claim.ci` overrides).

The verdict is computed, never written: :func:`verdict_of` takes the per-seed paired differences
``treatment - reference`` and their mean's 95 % Student-t interval
(:func:`experiments.statistics.t_interval`):

- ``reproduced in direction``: the interval excludes 0 on the paper's side;
- ``not reproduced``: it excludes 0 on the other side;
- ``inconclusive``: it contains 0, or there are fewer than 2 seeds (no interval).

"In direction" only: a claim whose paper reports a large effect and whose measurement shows a
small one in the same direction is reproduced in direction; its diagnosis
(:meth:`Claim.diagnose`, a template filled with the measured numbers) says how large.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from common.registry import Configurable, Params, Registry
from experiments.statistics import CONFIDENCE, Interval, t_interval

Size = Literal["full", "ci"]
SIZES: tuple[Size, ...] = ("full", "ci")
Direction = Literal["lower", "higher"]
Verdict = Literal["reproduced in direction", "not reproduced", "inconclusive"]
REPRODUCED: Verdict = "reproduced in direction"
NOT_REPRODUCED: Verdict = "not reproduced"
INCONCLUSIVE: Verdict = "inconclusive"
DEFAULT_STORE = Path("model_store")


class ClaimParams(Params):
    """Parameters every claim shares (each claim adds its own; defaults are the ``full`` size)."""


class Measurement(BaseModel):
    """One seed of one claim at one size: the treatment's and the reference's number, extra numbers
    for the diagnosis, the settings it ran with (a cached measurement is reused only with the same
    settings) and its wall time."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    claim: str
    size: Size
    seed: int
    treatment: float
    reference: float
    extra: dict[str, float] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0

    @property
    def difference(self) -> float:
        """``treatment - reference``: the paired difference the verdict is computed from."""
        return self.treatment - self.reference


def difference_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """Mean of the paired differences and its Student-t interval (None without a finite value)."""
    return t_interval(differences, confidence)


def verdict_of(differences: Sequence[float], direction: Direction, confidence: float = CONFIDENCE) -> Verdict:
    """The verdict of the paired differences ``treatment - reference`` (see the module docstring):
    where the ``confidence`` Student-t interval of their mean lies with respect to 0."""
    interval = difference_interval(differences, confidence)
    if interval is None or interval.low is None or interval.high is None:
        return INCONCLUSIVE
    if interval.high < 0:
        return REPRODUCED if direction == "lower" else NOT_REPRODUCED
    if interval.low > 0:
        return REPRODUCED if direction == "higher" else NOT_REPRODUCED
    return INCONCLUSIVE


class SeedNumbers(BaseModel):
    """One seed's numbers as ``claims.json`` records them (a test recomputes the verdict from them)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    seed: int
    treatment: float
    reference: float
    extra: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0


class ClaimRow(BaseModel):
    """A claim's row of ``docs/claims.md`` / ``docs/claims.json``: the paper's side, ours over the
    seeds (intervals of the treatment, the reference, their paired difference and every extra
    number), the computed verdict, the diagnosis and the command that reproduces the row."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    name: str
    paper: str
    figure: str
    metric: str
    treatment_label: str
    reference_label: str
    direction: Direction
    size: Size
    params: dict[str, Any]
    per_seed: list[SeedNumbers]
    treatment: Interval | None
    reference: Interval | None
    difference: Interval | None
    extra: dict[str, Interval] = Field(default_factory=dict)
    verdict: Verdict
    diagnosis: str = ""
    command: str = ""
    seconds: float = 0.0

    @property
    def claimed(self) -> str:
        """What the paper claims, in words: ``<treatment> lower than <reference>``."""
        return f"{self.treatment_label} {self.direction} than {self.reference_label}"

    @property
    def seeds(self) -> list[int]:
        return [s.seed for s in self.per_seed]

    def mean(self, key: str) -> float:
        """The mean over seeds of an extra number (NaN when no seed measured it)."""
        interval = self.extra.get(key)
        return math.nan if interval is None else interval.mean


class Claim(Configurable, abc.ABC):
    """A paper's headline claim, measured at small scale (see the module docstring).

    ``Claim(params, store=..., device=...)``: ``params`` override the ``full`` defaults of
    :attr:`Params`; ``store`` is the model store victims are trained into or reused from (the
    runner gives the ``ci`` size a store of its own); ``device`` where networks train.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    figure: ClassVar[str]
    """The paper's figure, as text (its number and setting)."""
    metric: ClassVar[str]
    """What both arms measure, with the data it is measured on."""
    treatment: ClassVar[str]
    reference: ClassVar[str]
    direction: ClassVar[Direction]
    """The paper's claim: the treatment ``lower`` or ``higher`` than the reference."""
    Params: ClassVar[type[ClaimParams]] = ClaimParams
    ci: ClassVar[dict[str, Any]] = {}
    """Overrides of :attr:`Params` for the ``ci`` size (seconds, synthetic data)."""
    full_minutes: ClassVar[float] = 0.0
    """Estimated wall minutes of one ``full`` seed on 2 CPU cores (victims already in the store)."""
    setup_minutes: ClassVar[float] = 0.0
    """Estimated wall minutes to train what the claim needs once (its victims) on 2 CPU cores."""
    group: ClassVar[str] = ""
    """Claims of one group share work in memory (the AST rows share the plain teacher's student,
    the RDA rows one RDA surrogate per seed): ``stealrange claims --jobs N`` runs a group in one
    process. Empty: a group of its own."""

    def victims(self, size: Size) -> list[Any]:
        """The victim recipes (:class:`victims.recipes.VictimRecipe`) the claim steals at ``size``:
        the runner trains them into the store before any measurement, one after another with every
        core (:func:`experiments.claims.runner.prepare_victims`), so parallel jobs never train the
        same victim twice or race on its folder. Default: none."""
        return []

    @classmethod
    def group_name(cls) -> str:
        """:attr:`group`, or the claim's own name."""
        return cls.group or cls.name

    def __init__(
        self,
        params: BaseModel | dict[str, Any] | None = None,
        *,
        store: Path = DEFAULT_STORE,
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> None:
        super().__init__(params, **overrides)
        self.store = Path(store)
        self.device = torch.device(device)

    def settings(self, size: Size) -> Any:
        """The parameters at ``size``: :attr:`params` (``full``), with :attr:`ci` over them (``ci``)."""
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
        if size == "full":
            return self.params
        return self.Params.model_validate({**self.params.model_dump(), **self.ci})

    @abc.abstractmethod
    def measure(self, seed: int, size: Size) -> Measurement:
        """Measure both arms once with ``seed`` at ``size``."""

    @abc.abstractmethod
    def diagnose(self, row: ClaimRow) -> str:
        """One line explaining the row from its numbers (a template filled with them)."""

    def measurement(
        self, seed: int, size: Size, treatment: float, reference: float, started: float, **extra: float
    ) -> Measurement:
        """A :class:`Measurement` of this claim (``started``: ``time.perf_counter()`` at its start)."""
        return Measurement(
            claim=self.name,
            size=size,
            seed=seed,
            treatment=float(treatment),
            reference=float(reference),
            extra={k: float(v) for k, v in extra.items()},
            params=self.settings(size).model_dump(mode="json"),
            seconds=time.perf_counter() - started,
        )


CLAIMS = Registry[type[Claim]]("claim")
"""Every claim by name: ``@CLAIMS.register``; ``stealrange claims --only NAME``."""


def points(value: float) -> str:
    """A share as percentage points with its sign: ``+1.2``."""
    return f"{100 * value:+.1f}"


def interval_points(interval: Interval | None) -> str:
    """A difference interval in points: ``+1.2 [+0.3, +2.1]``; ``n/a`` or no bracket without one."""
    if interval is None:
        return "n/a"
    if interval.low is None or interval.high is None:
        return f"{points(interval.mean)} (no interval)"
    return f"{points(interval.mean)} [{points(interval.low)}, {points(interval.high)}]"

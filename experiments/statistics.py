"""What the range can claim from its cells: aggregates over seeds, intervals, separations, and how
many queries (and how long at the key's rate limit) an attack needs to recover a share of the
victim's gain.

Everything reads typed results (:class:`experiments.results.CellLine` and its family's
:class:`attacker_client.runs.RunResult`), never raw dicts:

- :func:`aggregate` groups the finished cells by (victim, defense, attack, budget): one
  :class:`CellGroup` per group, holding its cells over seeds;
- :func:`t_interval`: mean and 95 % Student-t interval, ``mean +/- t_{0.975, n-1} s / sqrt(n)``
  (sample standard deviation ``s``); with one value (one seed) no interval exists
  (``half_width`` None), and nothing built on it is called significant;
- :func:`compare` / :func:`separated`: one value is higher or lower than another only where both
  intervals exist and do not overlap (a conservative test: two 95 % intervals that do not overlap
  differ at well below the 5 % level);
- :func:`queries_to_recover`: the queries at which the mean share of the victim's gain recovered
  (:attr:`RunResult.gain_recovered`, mean over seeds at each budget) reaches a target (50 %, 90 %),
  by linear interpolation between the budgets (x: the mean queries the server charged at each
  budget). Its interval comes from the mean's interval bounds: the queries at which the upper bound
  of the 95 % band (mean + half-width) reaches the target, and at which its lower bound does. It is
  not a t interval of the crossing point: per-seed crossings are censored ("not reached") too often
  to average. Below the smallest budget nothing was measured: a target already reached there is
  "<= smallest budget"; one not reached at the largest is "not reached" (``> largest``).
- :func:`duration_text`: queries at the key's rate (images/s) as days / hours / minutes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict
from scipy import stats

from attacker_client.runs import RunResult
from experiments.results import CellLine

CONFIDENCE = 0.95


class Interval(BaseModel):
    """Mean of ``n`` values and the half-width of its Student-t interval (None when n < 2)."""

    model_config = ConfigDict(frozen=True)

    n: int
    mean: float
    half_width: float | None

    @property
    def has_interval(self) -> bool:
        return self.half_width is not None

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def text(self, digits: int = 3, scale: float = 1.0, unit: str = "", with_n: bool = True) -> str:
        """``0.801 ± 0.012 (n 3)``; one value: ``0.801 (n 1)`` (no interval)."""
        mean = f"{self.mean * scale:.{digits}f}{unit}"
        body = mean if self.half_width is None else f"{mean} ± {self.half_width * scale:.{digits}f}{unit}"
        return f"{body} (n {self.n})" if with_n else body


def t_interval(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Interval | None:
    """Mean and Student-t ``confidence`` interval of the known ``values`` (None entries are
    skipped); None when there are none; no interval (``half_width`` None) for a single value."""
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not known:
        return None
    n = len(known)
    mean = sum(known) / n
    if n < 2:
        return Interval(n=1, mean=mean, half_width=None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in known) / (n - 1))
    quantile = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return Interval(n=n, mean=mean, half_width=quantile * sd / math.sqrt(n))


Comparison = Literal["higher", "lower", "overlap", "no_interval"]


def compare(a: Interval | None, b: Interval | None) -> Comparison:
    """``higher`` / ``lower`` when the intervals of ``a`` and ``b`` separate, ``overlap`` when they
    overlap, ``no_interval`` when either is missing or has no interval (a single seed)."""
    if a is None or b is None or a.low is None or a.high is None or b.low is None or b.high is None:
        return "no_interval"
    if a.low > b.high:
        return "higher"
    if a.high < b.low:
        return "lower"
    return "overlap"


def separated(a: Interval | None, b: Interval | None) -> bool:
    """Whether both intervals exist and do not overlap."""
    return compare(a, b) in ("higher", "lower")


def above(a: Interval | None, value: float) -> bool:
    """Whether ``a``'s whole interval lies above ``value`` (False without an interval)."""
    return a is not None and a.low is not None and a.low > value


@dataclass(frozen=True)
class Metric:
    """A number every finished cell may report, read from its typed result."""

    name: str
    read: Callable[[RunResult], float | None]
    label_of: Callable[[type[RunResult]], str]

    def label(self, family: type[RunResult]) -> str:
        return self.label_of(family)


def invariant_label(family: type[RunResult]) -> str:
    """What ``invariant_success`` measures: the family's ``invariant_success_label``, else (it is
    the plain success) its ``success_label``."""
    return family.invariant_success_label or family.success_label


def has_invariant_success(family: type[RunResult]) -> bool:
    """Whether the family measures a transform-invariant success of its own."""
    return family.invariant_success is not RunResult.invariant_success


QUALITY = Metric("quality", lambda r: r.quality, lambda c: c.quality_label)
VICTIM_QUALITY = Metric("victim_quality", lambda r: r.victim_quality, lambda c: f"victim's {c.quality_label}")
BASELINE_QUALITY = Metric(
    "baseline_quality", lambda r: r.baseline_quality, lambda c: f"no-query alternative's {c.quality_label}"
)
GAIN_RECOVERED = Metric(
    "gain_recovered", lambda r: r.gain_recovered, lambda c: "share of the victim's gain recovered"
)
SUCCESS = Metric("success", lambda r: r.success, lambda c: c.success_label)
INVARIANT_SUCCESS = Metric("invariant_success", lambda r: r.invariant_success, invariant_label)
QUERIES = Metric("queries", lambda r: float(r.queries.spent), lambda c: "queries spent (server usage)")


@dataclass(frozen=True, order=True)
class GroupKey:
    """A point of the matrix, seeds aside."""

    victim: str
    defense: str
    attack: str
    budget: int


@dataclass
class CellGroup:
    """The finished cells of one (victim, defense, attack, budget), one per seed."""

    key: GroupKey
    lines: list[CellLine] = field(default_factory=list)

    @property
    def results(self) -> list[RunResult]:
        return [line.result for line in self.lines if line.result is not None]

    @property
    def family(self) -> type[RunResult]:
        return type(self.results[0])

    @property
    def seeds(self) -> list[int]:
        return sorted(line.seed for line in self.lines)

    def interval(self, metric: Metric) -> Interval | None:
        return t_interval(metric.read(result) for result in self.results)


def aggregate(lines: Iterable[CellLine]) -> dict[GroupKey, CellGroup]:
    """The finished cells grouped by (victim, defense, attack, budget), in the order they come."""
    groups: dict[GroupKey, CellGroup] = {}
    for line in lines:
        if not line.ok or line.result is None:
            continue
        key = GroupKey(line.victim, line.defense, line.attack, line.budget)
        groups.setdefault(key, CellGroup(key)).lines.append(line)
    return groups


def any_interval(groups: Iterable[CellGroup]) -> bool:
    """Whether any group has at least two seeds (so some interval exists)."""
    return any(len(group.lines) >= 2 for group in groups)


# How fast: queries to recover a share of the victim's gain.

Bound = Literal["exact", "at_most", "not_reached"]


class Reach(BaseModel):
    """Where a curve reaches a target: ``exact`` (interpolated between two budgets), ``at_most``
    (already at the smallest budget: ``queries`` is that budget's), ``not_reached`` (not by the
    largest: ``queries`` is the largest budget's)."""

    bound: Bound
    queries: float

    def text(self) -> str:
        q = queries_text(self.queries)
        return {"exact": q, "at_most": f"≤ {q}", "not_reached": f"> {q}"}[self.bound]


def reach(xs: Sequence[float], ys: Sequence[float], target: float) -> Reach:
    """The first ``x`` at which the piecewise-linear curve through ``(xs, ys)`` (``xs`` ascending)
    reaches ``target``."""
    if not xs or len(xs) != len(ys):
        raise ValueError("reach needs as many y as x, at least one")
    if ys[0] >= target:
        return Reach(bound="at_most", queries=xs[0])
    for i in range(1, len(xs)):
        if ys[i] >= target:  # and ys[i - 1] < target: the segment crosses it
            x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
            return Reach(bound="exact", queries=x0 + (target - y0) / (y1 - y0) * (x1 - x0))
    return Reach(bound="not_reached", queries=xs[-1])


class Recovery(BaseModel):
    """Queries to recover ``target`` of the victim's gain: from the mean curve (``mean``) and from
    its 95 % band's upper bound (``fastest``) and lower bound (``slowest``; None without intervals)."""

    target: float
    mean: Reach
    fastest: Reach | None
    slowest: Reach | None

    @property
    def has_band(self) -> bool:
        """Whether the interval says more than the mean: it exists and is not all one bound
        (``not reached`` or ``<=`` at both ends and for the mean)."""
        if self.fastest is None or self.slowest is None:
            return False
        return len({self.mean.text(), self.fastest.text(), self.slowest.text()}) > 1

    def text(self) -> str:
        """``1.8k [≤ 1k, 3.1k]``, ``not reached (> 4k)``."""
        main = self.mean.text()
        if self.mean.bound == "not_reached":
            main = f"not reached ({main})"
        if self.fastest is None or self.slowest is None or not self.has_band:
            return main
        return f"{main} [{self.fastest.text()}, {self.slowest.text()}]"


class RecoveryCurve(BaseModel):
    """The mean gain recovered at each budget of one (victim, attack, defense)."""

    victim: str
    attack: str
    defense: str
    budgets: list[int]
    queries: list[float]
    gain: list[Interval]

    @property
    def min_seeds(self) -> int:
        return min(g.n for g in self.gain)

    def recovery(self, target: float) -> Recovery:
        xs = self.queries
        mean = reach(xs, [g.mean for g in self.gain], target)
        if any(g.half_width is None for g in self.gain):
            return Recovery(target=target, mean=mean, fastest=None, slowest=None)
        fastest = reach(xs, [g.high for g in self.gain if g.high is not None], target)
        slowest = reach(xs, [g.low for g in self.gain if g.low is not None], target)
        return Recovery(target=target, mean=mean, fastest=fastest, slowest=slowest)


def recovery_curves(groups: dict[GroupKey, CellGroup]) -> list[RecoveryCurve]:
    """One curve per (victim, attack, defense) whose cells measure the gain recovered, its points
    the budgets in ascending order (x: the mean queries the server charged there)."""
    by_curve: dict[tuple[str, str, str], list[CellGroup]] = {}
    for key, group in groups.items():
        by_curve.setdefault((key.victim, key.attack, key.defense), []).append(group)
    curves = []
    for (victim, attack, defense), members in by_curve.items():
        points = []
        for group in sorted(members, key=lambda g: g.key.budget):
            gain, queries = group.interval(GAIN_RECOVERED), group.interval(QUERIES)
            if gain is not None and queries is not None:
                points.append((group.key.budget, queries.mean, gain))
        if points:
            curves.append(
                RecoveryCurve(
                    victim=victim,
                    attack=attack,
                    defense=defense,
                    budgets=[p[0] for p in points],
                    queries=[p[1] for p in points],
                    gain=[p[2] for p in points],
                )
            )
    return curves


def queries_text(queries: float) -> str:
    """``1.8k``, ``950``, ``12k``."""
    if queries >= 10_000:
        return f"{queries / 1000:.0f}k"
    if queries >= 1000:
        return f"{queries / 1000:.1f}k".replace(".0k", "k")
    return f"{queries:.0f}"


def duration_text(seconds: float) -> str:
    """Seconds as a person reads them: ``40 s``, ``12 min``, ``3.5 h``, ``2.1 days``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86_400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def reach_time(r: Reach, rate: float) -> str:
    """A :class:`Reach` at ``rate`` images/s: ``queries / rate`` seconds, human-readable."""
    t = duration_text(r.queries / rate)
    return {"exact": t, "at_most": f"≤ {t}", "not_reached": f"> {t}"}[r.bound]


def recovery_time(recovery: Recovery, rate: float | None) -> str:
    """The time :meth:`Recovery.text` means at the key's rate limit; ``no rate limit`` when none."""
    if rate is None:
        return "no rate limit"
    main = reach_time(recovery.mean, rate)
    if recovery.mean.bound == "not_reached":
        main = f"not reached ({main})"
    if recovery.fastest is None or recovery.slowest is None or not recovery.has_band:
        return main
    return f"{main} [{reach_time(recovery.fastest, rate)}, {reach_time(recovery.slowest, rate)}]"


class KeyRate(BaseModel):
    """The rate limit of the range's keys, from the run's ``scenario.yaml`` (images/s; None: none)."""

    model_config = ConfigDict(extra="ignore")

    rate: float | None = None
    burst: int | None = None
    report_rate: float | None = None

    @property
    def effective(self) -> float | None:
        """The keys' rate limit, else the planned per-key rate the report converts at."""
        return self.rate if self.rate is not None else self.report_rate


def key_rate(run_dir: Path) -> KeyRate | None:
    """The scenario's key rate as the runner recorded it (``run_dir/scenario.yaml``); None when the
    run has no scenario file (a results file copied alone)."""
    path = Path(run_dir) / "scenario.yaml"
    if not path.is_file():
        return None
    return KeyRate.model_validate(yaml.safe_load(path.read_text()) or {})

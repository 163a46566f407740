"""``stealrange claims``: measure the papers' claims over seeds, cache every measurement, compute the
verdicts and write ``docs/claims.md`` with its machine-readable twin ``docs/claims.json``.

:func:`run_claims`:

1. builds the chosen claims (default: every one in :data:`experiments.claims.base.CLAIMS`); the
   ``ci`` size gets a model store of its own under the cache (``<cache>/ci/model_store``) so its
   toy victims never land in the real one;
2. measures seed-major (seed 0 of every claim, then seed 1, ...; claims sharing work, as the SEP
   radii share their protecting run, find it in memory); with ``jobs`` > 1 the claims' groups
   (:attr:`experiments.claims.base.Claim.group`: claims sharing victims or memory) are split over
   that many processes of ``cores / jobs`` torch threads each (:func:`plan_jobs`): small CPU
   networks gain little from a second thread, so two single-thread jobs on 2 cores finish sooner;
   each (claim, size, seed) cached as
   ``<cache>/<size>/<claim>/seed-<seed>.json``: a rerun reads what is there and measures only what
   is missing (or what was measured with other settings), so an interrupted run resumes; a
   measurement that fails is reported and the run goes on;
3. per claim: the intervals of both arms, of their paired difference and of every extra number
   (:func:`experiments.statistics.t_interval`), the verdict computed from the differences
   (:func:`experiments.claims.base.verdict_of`), the claim's diagnosis from those numbers, and the
   command that reproduces the row;
4. writes ``out`` (markdown) and ``out`` with the suffix ``.json`` (:class:`ClaimsReport`: every
   per-seed number, so a reader, or a test, can recompute every verdict).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from experiments.claims.base import (
    CLAIMS,
    DEFAULT_STORE,
    SIZES,
    Claim,
    ClaimRow,
    Measurement,
    SeedNumbers,
    Size,
    difference_interval,
    interval_points,
    verdict_of,
)
from experiments.statistics import CONFIDENCE, Interval, t_interval

DEFAULT_OUT = Path("docs/claims.md")
DEFAULT_CACHE = Path("runs/claims")
DEFAULT_SEEDS = 3
RULE = (
    "Each verdict is computed from the per-seed paired differences (treatment - reference): the mean "
    "difference and its 95 % Student-t interval; **reproduced in direction** when the interval excludes "
    "0 on the paper's side, **not reproduced** when it excludes 0 on the other side, **inconclusive** "
    "when it contains 0 or fewer than 2 seeds were measured. Direction only: the diagnosis says how "
    "large the effect is next to the paper's."
)
console = Console(stderr=True)


class ClaimsReport(BaseModel):
    """What ``docs/claims.json`` holds: the run's size and seeds, the rule, one row per claim."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    generated: str
    size: Size
    seeds: list[int]
    confidence: float = CONFIDENCE
    rule: str = RULE
    rows: list[ClaimRow]
    errors: dict[str, list[str]] = Field(default_factory=dict)
    seconds: float = 0.0


def natural_key(name: str) -> list[int | str]:
    """Sort key reading digit runs as numbers: ``sep_eps8`` before ``sep_eps16``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def cache_path(cache: Path, size: Size, name: str, seed: int) -> Path:
    """Where the measurement of (claim ``name``, ``size``, ``seed``) is cached."""
    return Path(cache) / size / name / f"seed-{seed}.json"


def cached(claim: Claim, seed: int, size: Size, cache: Path) -> Measurement | None:
    """The cached measurement of (claim, size, seed) when it was made with today's settings."""
    path = cache_path(cache, size, claim.name, seed)
    if not path.is_file():
        return None
    try:
        measurement = Measurement.model_validate_json(path.read_text())
    except ValueError:
        return None
    if measurement.params != claim.settings(size).model_dump(mode="json"):
        return None
    return measurement


def store_measurement(measurement: Measurement, cache: Path) -> Path:
    """Write ``measurement`` to its cache file (atomically: a half-written file is never read)."""
    path = cache_path(cache, measurement.size, measurement.claim, measurement.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(measurement.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
    return path


def command_for(name: str, seeds: int, size: Size) -> str:
    """The command that reproduces one row (into a file of its own, leaving the full report alone)."""
    return f"stealrange claims --only {name} --seeds {seeds} --size {size} --out {DEFAULT_CACHE}/{name}.md"


def summarise(claim: Claim, measurements: Sequence[Measurement], size: Size, seeds: int) -> ClaimRow:
    """The claim's row from its per-seed measurements: intervals, computed verdict, diagnosis."""
    ordered = sorted(measurements, key=lambda m: m.seed)
    keys = sorted({k for m in ordered for k in m.extra})
    extra: dict[str, Interval] = {}
    for key in keys:
        interval = t_interval(m.extra.get(key) for m in ordered)
        if interval is not None:
            extra[key] = interval
    differences = [m.difference for m in ordered]
    row = ClaimRow(
        name=claim.name,
        paper=claim.paper,
        figure=claim.figure,
        metric=claim.metric,
        treatment_label=claim.treatment,
        reference_label=claim.reference,
        direction=claim.direction,
        size=size,
        params=claim.settings(size).model_dump(mode="json"),
        per_seed=[
            SeedNumbers(
                seed=m.seed, treatment=m.treatment, reference=m.reference, extra=m.extra, seconds=m.seconds
            )
            for m in ordered
        ],
        treatment=t_interval(m.treatment for m in ordered),
        reference=t_interval(m.reference for m in ordered),
        difference=difference_interval(differences),
        extra=extra,
        verdict=verdict_of(differences, claim.direction),
        command=command_for(claim.name, seeds, size),
        seconds=sum(m.seconds for m in ordered),
    )
    if not ordered:
        return row.model_copy(update={"diagnosis": "no seed was measured"})
    try:
        diagnosis = claim.diagnose(row)
    except Exception as exc:  # a failed diagnosis must not lose the measurements
        diagnosis = f"(the diagnosis failed: {type(exc).__name__}: {exc})"
    return row.model_copy(update={"diagnosis": diagnosis})


def run_claims(
    only: Sequence[str] | None = None,
    seeds: int = DEFAULT_SEEDS,
    size: Size = "full",
    out: Path = DEFAULT_OUT,
    cache: Path = DEFAULT_CACHE,
    store: Path = DEFAULT_STORE,
    device: str = "cpu",
    fresh: bool = False,
    log: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> ClaimsReport:
    """Measure ``only`` (default: every registered claim) over seeds ``0..seeds-1`` at ``size``,
    write ``out`` and its ``.json`` twin, and return the report (see the module docstring);
    ``jobs`` > 1 measures the claims' groups in that many processes (:func:`plan_jobs`)."""
    say = log or console.print
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    if seeds < 1:
        raise ValueError("at least one seed is needed")
    if jobs < 1:
        raise ValueError("at least one job is needed")
    started = time.perf_counter()
    chosen = [CLAIMS.get(n).name for n in only] if only else [cls.name for _, cls in CLAIMS.items()]
    names = sorted(dict.fromkeys(chosen), key=natural_key)
    claim_store = Path(cache) / "ci" / "model_store" if size == "ci" else Path(store)
    claims = [CLAIMS.get(name)(store=claim_store, device=device) for name in names]
    if size == "full":
        minutes = sum(seeds * c.full_minutes + c.setup_minutes for c in claims)
        say(
            f"{len(claims)} claims x {seeds} seeds: about {minutes:.0f} min of 2 cores with every victim "
            f"to train, measured in {jobs} job(s) (cached seeds and stored victims are skipped)"
        )
    prepare_victims(claims, size, say)
    if jobs > 1 and len({c.group_name() for c in claims}) > 1:
        measured, errors = _measure_in_processes(
            claims, seeds, size, cache, claim_store, device, fresh, jobs, say
        )
    else:
        measured, errors = measure(claims, seeds, size, cache, fresh, say)
    rows = [summarise(claim, measured[claim.name], size, seeds) for claim in claims]
    report = ClaimsReport(
        generated=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        size=size,
        seeds=list(range(seeds)),
        rows=rows,
        errors=errors,
        seconds=time.perf_counter() - started,
    )
    write_report(report, out)
    return report


def measure(
    claims: Sequence[Claim], seeds: int, size: Size, cache: Path, fresh: bool, say: Callable[[str], None]
) -> tuple[dict[str, list[Measurement]], dict[str, list[str]]]:
    """Measure ``claims`` seed-major in this process, reading and writing the cache; returns the
    measurements and the failures by claim."""
    measured: dict[str, list[Measurement]] = {c.name: [] for c in claims}
    errors: dict[str, list[str]] = {}
    for seed in range(seeds):
        for claim in claims:
            hit = None if fresh else cached(claim, seed, size, cache)
            if hit is not None:
                measured[claim.name].append(hit)
                continue
            say(f"{claim.name}: measuring seed {seed} ({size})")
            try:
                measurement = claim.measure(seed, size)
            except Exception as exc:  # report it, keep the other claims' work
                errors.setdefault(claim.name, []).append(f"seed {seed}: {type(exc).__name__}: {exc}")
                say(traceback.format_exc())
                continue
            store_measurement(measurement, cache)
            measured[claim.name].append(measurement)
            say(
                f"{claim.name} seed {seed}: treatment {measurement.treatment:.4f}, "
                f"reference {measurement.reference:.4f} ({measurement.seconds:.0f} s)"
            )
    return measured, errors


def prepare_victims(claims: Sequence[Claim], size: Size, say: Callable[[str], None]) -> None:
    """Train every victim the claims steal (:meth:`Claim.victims`) into their store, one after
    another in this process with every core, before any measurement: jobs then only read them. A
    victim already stored by the same recipe is reused (:func:`victims.recipes.train_victim`)."""
    from victims.recipes import is_trained, train_victim

    seen: set[tuple[Path, str]] = set()
    for claim in claims:
        for recipe in claim.victims(size):
            key = (claim.store, recipe.model_dump_json())
            if key in seen:
                continue
            seen.add(key)
            if not is_trained(recipe, claim.store):
                say(f"training victim {recipe.name} for {claim.name} ({size})")
                started = time.perf_counter()
                train_victim(recipe, claim.store, progress=False)
                say(f"victim {recipe.name}: {time.perf_counter() - started:.0f} s")


def plan_jobs(claims: Sequence[Claim], seeds: int, jobs: int) -> list[list[str]]:
    """The claims' names split into at most ``jobs`` lists, each group (:meth:`Claim.group_name`)
    whole in one list, balanced by estimated minutes (longest group first into the lightest list)."""
    groups: dict[str, list[Claim]] = {}
    for claim in claims:
        groups.setdefault(claim.group_name(), []).append(claim)

    def cost(members: list[Claim]) -> float:  # victims are trained before the jobs start
        return sum(seeds * c.full_minutes for c in members) or 1e-3

    bins: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(min(jobs, len(groups)))]
    for members in sorted(groups.values(), key=lambda m: (-cost(m), m[0].name)):
        lightest = min(range(len(bins)), key=lambda i: (bins[i][0], i))
        load, names = bins[lightest]
        bins[lightest] = (load + cost(members), names + [c.name for c in members])
    return [names for _, names in bins if names]


def _measure_job(
    names: list[str], seeds: int, size: Size, cache: Path, store: Path, device: str, fresh: bool, threads: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
    """One job of :func:`_measure_in_processes`, in its own process (``threads`` torch threads)."""
    import torch

    torch.set_num_threads(threads)
    claims = [CLAIMS.get(name)(store=store, device=device) for name in names]
    measured, errors = measure(claims, seeds, size, cache, fresh, console.print)
    return {k: [m.model_dump(mode="json") for m in v] for k, v in measured.items()}, errors


def _measure_in_processes(
    claims: Sequence[Claim],
    seeds: int,
    size: Size,
    cache: Path,
    store: Path,
    device: str,
    fresh: bool,
    jobs: int,
    say: Callable[[str], None],
) -> tuple[dict[str, list[Measurement]], dict[str, list[str]]]:
    """Measure the claims' groups in ``jobs`` processes (spawned: each imports torch afresh and runs
    ``cores // jobs`` torch threads); a job that dies is reported as a failure of its claims."""
    plan = plan_jobs(claims, seeds, jobs)
    threads = max(1, (os.cpu_count() or 1) // len(plan))
    say(f"{len(plan)} jobs of {threads} torch thread(s): " + "; ".join(", ".join(names) for names in plan))
    measured: dict[str, list[Measurement]] = {c.name: [] for c in claims}
    errors: dict[str, list[str]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(plan), mp_context=context) as pool:
        futures = {
            pool.submit(_measure_job, names, seeds, size, cache, store, device, fresh, threads): names
            for names in plan
        }
        for future in as_completed(futures):
            try:
                job_measured, job_errors = future.result()
            except Exception as exc:  # a job that died: its claims failed, the others' work is kept
                for name in futures[future]:
                    errors.setdefault(name, []).append(f"job failed: {type(exc).__name__}: {exc}")
                continue
            for name, items in job_measured.items():
                measured[name] = [Measurement.model_validate(m) for m in items]
            errors.update(job_errors)
    return measured, errors


def json_path(out: Path) -> Path:
    """The machine-readable twin of the markdown report ``out``."""
    return Path(out).with_suffix(".json")


def write_report(report: ClaimsReport, out: Path) -> None:
    """``out`` (markdown) and its ``.json`` twin."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(report, json_path(out).name))
    json_path(out).write_text(report.model_dump_json(indent=2) + "\n")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _interval(interval: Interval | None) -> str:
    return "n/a" if interval is None else interval.text(digits=3)


def render_markdown(report: ClaimsReport, json_name: str = "claims.json") -> str:
    """The report as markdown: a summary table, then one section per claim."""
    seeds = ", ".join(str(s) for s in report.seeds)
    lines = [
        "# The papers' claims, checked",
        "",
        f"Written by `stealrange claims --seeds {len(report.seeds)} --size {report.size}` on "
        f"{report.generated} ({report.seconds / 60:.1f} min); seeds {seeds}; the per-seed numbers "
        f"are in [`{json_name}`]({json_name}).",
        "",
        RULE,
        "",
        "| claim | paper's figure | ours: treatment | ours: reference "
        "| difference, points (95 % interval) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        lines.append(
            f"| {row.name} | {_cell(row.figure)} | {_interval(row.treatment)} | {_interval(row.reference)} "
            f"| {interval_points(row.difference)} | {row.verdict} |"
        )
    for row in report.rows:
        per_seed = "; ".join(f"seed {s.seed}: {s.treatment:.4f} / {s.reference:.4f}" for s in row.per_seed)
        lines += [
            "",
            f"## {row.name}",
            "",
            f"- **Paper**: {row.paper}",
            f"- **Paper's figure**: {row.figure}",
            f"- **Measured**: {row.metric}; the paper claims: {row.claimed}",
            f"- **Treatment**: {row.treatment_label}: {_interval(row.treatment)}",
            f"- **Reference**: {row.reference_label}: {_interval(row.reference)}",
            f"- **Difference** (treatment - reference, points): {interval_points(row.difference)}",
            f"- **Verdict**: {row.verdict}",
            f"- **Diagnosis**: {row.diagnosis}",
            f"- **Per seed** (treatment / reference): {per_seed or 'none'}",
            "- **Extra numbers** (mean over seeds): "
            + (", ".join(f"{k} {v.mean:.4g}" for k, v in row.extra.items()) or "none"),
            f"- **Reproduce**: `{row.command}`",
            f"- **Settings** ({row.size}): `{row.params}`; {row.seconds / 60:.1f} min measured",
        ]
        for error in report.errors.get(row.name, []):
            lines.append(f"- **Failed**: {_cell(error)}")
    return "\n".join(lines) + "\n"

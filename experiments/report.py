"""The range's report, rebuilt from ``results.jsonl`` alone (``stealrange report runs/<name>``).

The lines are read back through their models (:mod:`experiments.results`); everything a table
cell, a note or a plot shows of a cell comes from its family's typed result
(:class:`attacker_client.runs.RunResult`: its success and transform-invariant success, the stolen
model's, the victim's and the no-query alternative's quality, the share of the victim's gain
recovered, its cell text, its notes), so the report knows no family by name. Cells are aggregated
over seeds per (victim, defense, attack, budget) by :mod:`experiments.statistics`: every number is
a mean ± the half-width of its 95 % Student-t interval with n seeds (n 1: no interval, and nothing
called significant).

``report.md`` holds, in this order:

- **How fast a model is stolen** (what a provider reads first): per victim, attack and defense, the
  queries needed to recover 50 % and 90 % of the victim's gain (interpolated between budgets, with
  the interval where the 95 % band of the mean reaches the target, or "not reached") and what that
  is in time at the key's rate limit (the scenario's ``rate``, from the run's ``scenario.yaml``);
- per victim, the **verdicts**: per budget, the defenses that lower each attack's success
  (transform-invariant: linear CKA for encoders) and quality relative to ``none``, the attacks
  ahead of others, the gains above 0, all only where the intervals separate; then one table per
  metric (rows attacks, columns defenses, every budget in each cell): quality (the victim's score
  beside the title), the transform-invariant success, the gain recovered, the no-query
  alternative's quality, the plain success (cosine for encoders); then each family's notes;
- the defenses' cost to honest users (measured once: n 1); the plots; the queries per key over
  seeds (audit streams); failed cells; every cell's own text, seed by seed (folded).

Plots (PNG, matplotlib; written before ``report.md``, which links those that exist):

- ``quality_vs_queries.png``: success, transform-invariant success, quality and gain recovered
  against queries spent (mean and 95 % interval), one line per defense, one column per attack;
- ``tradeoff.png``: transform-invariant attack success at the largest budget (mean and interval)
  against the defense's cost to honest users (a good defense sits low and to the left);
- ``audit.png``: cumulative images charged against time, per key (from its audit stream).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from attacker_client.runs import RunResult, budget_text, fmt
from experiments.results import RESULTS_FILE, CellLine, read_results
from experiments.statistics import (
    BASELINE_QUALITY,
    CONFIDENCE,
    GAIN_RECOVERED,
    INVARIANT_SUCCESS,
    QUALITY,
    QUERIES,
    SUCCESS,
    CellGroup,
    GroupKey,
    Interval,
    KeyRate,
    Metric,
    above,
    aggregate,
    any_interval,
    compare,
    has_invariant_success,
    invariant_label,
    key_rate,
    recovery_curves,
    recovery_time,
    t_interval,
)

REPORT_FILE = "report.md"
PLOTS = ("quality_vs_queries.png", "tradeoff.png", "audit.png")


class DefenseCost(BaseModel):
    """A defense's cost to honest users (``costs.json``, :func:`defenses.cost.defense_cost`): an
    encoder's has cosine and linear-probe fields, a classifier's agreement, accuracy and L1."""

    model_config = ConfigDict(extra="allow")

    defense: str | None = None
    cosine: float | None = None
    linear_probe: float | None = None
    defended_linear_probe: float | None = None
    linear_probe_drop: float | None = None
    agreement: float | None = None
    accuracy: float | None = None
    defended_accuracy: float | None = None
    accuracy_drop: float | None = None
    l1: float | None = None

    @property
    def similarity(self) -> float | None:
        """Defended vs undefended answers: top-1 agreement, or the embeddings' cosine."""
        return self.agreement if self.agreement is not None else self.cosine

    @property
    def score(self) -> float | None:
        """The honest user's score undefended: test accuracy, or a linear probe's."""
        return self.accuracy if self.accuracy is not None else self.linear_probe

    @property
    def defended_score(self) -> float | None:
        return self.defended_accuracy if self.defended_accuracy is not None else self.defended_linear_probe

    @property
    def drop(self) -> float | None:
        """What the defense costs: the honest user's accuracy (or linear-probe accuracy) drop."""
        return self.linear_probe_drop if self.linear_probe_drop is not None else self.accuracy_drop


def _costs(run_dir: Path) -> dict[str, DefenseCost]:
    path = run_dir / "costs.json"
    raw: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    return {served: DefenseCost.model_validate(cost) for served, cost in raw.items()}


def cost_of(costs: dict[str, DefenseCost], line: CellLine) -> float | None:
    """The cost to honest users of the defense the cell's attack met."""
    cost = costs.get(line.served_name)
    return None if cost is None else cost.drop


def _result(line: CellLine) -> RunResult:
    """The typed result of a finished cell."""
    assert line.result is not None, line.cell
    return line.result


def _by_family(lines: list[CellLine]) -> dict[type[RunResult], list[CellLine]]:
    """Finished cells grouped by their result's class, in order of first appearance."""
    groups: dict[type[RunResult], list[CellLine]] = {}
    for line in lines:
        groups.setdefault(type(_result(line)), []).append(line)
    return groups


def _intervals_note(groups: dict[GroupKey, CellGroup]) -> str:
    """What the ± and n of every table mean, and whether any interval exists."""
    if not groups:
        return ""
    seeds = sorted({len(group.lines) for group in groups.values()})
    if not any_interval(groups.values()):
        return (
            "**One seed per cell: no intervals exist, and nothing in this report is marked significant** "
            "(numbers are single runs; n 1 everywhere). Run more seeds (`seeds:` in the scenario) to "
            "compare attacks and defenses."
        )
    return (
        "Numbers are means over seeds ± the half-width of their "
        f"{CONFIDENCE * 100:.0f} % Student-t interval, n the seeds (here "
        f"{', '.join(map(str, seeds))} per cell); with n 1 no interval exists. One attack or defense "
        "is called better than another only where the intervals separate."
    )


def how_fast_markdown(groups: dict[GroupKey, CellGroup], rate: KeyRate | None) -> list[str]:
    """The report's first section: queries (and time at the key's rate limit) to recover 50 % and
    90 % of the victim's gain, per victim, attack and defense
    (:func:`experiments.statistics.recovery_curves`)."""
    out = ["## How fast a model is stolen", ""]
    curves = recovery_curves(groups)
    if not curves:
        return [
            *out,
            "No cell measured the share of the victim's gain recovered (it needs the victim's score and "
            "the attacker's no-query alternative): nothing to time.",
            "",
        ]
    limit = None if rate is None else rate.effective
    if rate is None:
        rate_text = "the key's rate limit is unknown (the run has no `scenario.yaml`)"
    elif limit is None:
        rate_text = "the keys had no rate limit (the scenario's `rate` and `report_rate` are unset)"
    elif rate.rate is not None:
        rate_text = f"time is queries / the key's rate limit ({limit:g} images/s, the scenario's `rate`)"
    else:
        rate_text = (
            f"time is queries / a planned per-key limit of {limit:g} images/s (the scenario's "
            "`report_rate`; the range's own keys ran unlimited)"
        )
    out += [
        "Queries the server charged until the stolen model recovers 50 % and 90 % of the victim's gain "
        "over the attacker's no-query alternative (`(stolen - no-query) / (victim - no-query)`, the "
        "family's quality metric): the mean over seeds at each budget, interpolated linearly between "
        "budgets; in brackets, where the upper and the lower bound of its 95 % interval reach the target "
        "(none with one seed). `≤`: reached at the smallest budget already; `>` / not reached: not by the "
        f"largest. {rate_text[0].upper() + rate_text[1:]}.",
        "",
        "| victim | attack | defense | 50 %: queries | 50 %: time | 90 %: queries | 90 %: time "
        "| recovered at the largest budget | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for curve in curves:
        cells = [curve.victim, curve.attack, curve.defense]
        for target in (0.5, 0.9):
            recovery = curve.recovery(target)
            cells += [recovery.text(), recovery_time(recovery, limit) if rate is not None else "rate unknown"]
        last = curve.gain[-1]
        cells.append(f"{last.text(0, 100, ' %', with_n=False)} at {budget_text(curve.budgets[-1])}")
        cells.append(str(curve.min_seeds))
        out.append("| " + " | ".join(cells) + " |")
    timed = {(curve.victim, curve.attack, curve.defense) for curve in curves}
    untimed = list(
        dict.fromkeys(
            (k.victim, k.attack, k.defense) for k in groups if (k.victim, k.attack, k.defense) not in timed
        )
    )
    if untimed:
        names = ", ".join("/".join(triple) for triple in untimed)
        out += [
            "",
            f"Not timed (no cell measured the gain recovered: the victim does not beat the no-query "
            f"alternative there, or a score is missing): {names}.",
        ]
    return [*out, ""]


def _defense_lines(
    groups: dict[GroupKey, CellGroup],
    victim: str,
    defenses: list[str],
    attacks: list[str],
    budget: int,
    metric: Metric,
    label: str,
) -> str | None:
    """``{budget}, {label}: below none: attack: defenses; ...`` (separated intervals only)."""
    if "none" not in defenses:
        return None
    lower, higher = [], []
    compared = False
    for attack in attacks:
        base = groups.get(GroupKey(victim, "none", attack, budget))
        if base is None:
            continue
        compared = True
        below: list[str] = []
        over: list[str] = []
        for defense in defenses:
            group = groups.get(GroupKey(victim, defense, attack, budget))
            if defense == "none" or group is None:
                continue
            verdict = compare(group.interval(metric), base.interval(metric))
            (below if verdict == "lower" else over if verdict == "higher" else []).append(defense)
        if below:
            lower.append(f"{attack}: {', '.join(below)}")
        if over:
            higher.append(f"{attack}: {', '.join(over)}")
    if not compared:
        return None
    text = f"- {budget_text(budget)}, {label}: defenses that lower it relative to `none`: " + (
        "; ".join(lower) or "none separated"
    )
    if higher:
        text += ". Defenses that raise it: " + "; ".join(higher)
    return text + "."


def _attack_lines(
    groups: dict[GroupKey, CellGroup],
    victim: str,
    defenses: list[str],
    attacks: list[str],
    budget: int,
    metric: Metric,
    label: str,
) -> str | None:
    """``{budget}, {label}: attacks ahead: under defense: a > b, ...`` (separated intervals only)."""
    if len(attacks) < 2:
        return None
    parts = []
    for defense in defenses:
        ahead = []
        for i, a in enumerate(attacks):
            for b in attacks[i + 1 :]:
                ga, gb = (
                    groups.get(GroupKey(victim, defense, a, budget)),
                    groups.get(GroupKey(victim, defense, b, budget)),
                )
                if ga is None or gb is None:
                    continue
                verdict = compare(ga.interval(metric), gb.interval(metric))
                if verdict == "higher":
                    ahead.append(f"{a} > {b}")
                elif verdict == "lower":
                    ahead.append(f"{b} > {a}")
        if ahead:
            parts.append(f"under {defense}: {', '.join(ahead)}")
    return (
        f"- {budget_text(budget)}, {label}: attacks ahead of others: "
        + ("; ".join(parts) or "none separated")
        + "."
    )


def _gain_line(
    groups: dict[GroupKey, CellGroup], victim: str, defenses: list[str], attacks: list[str], budget: int
) -> str | None:
    """Which attacks' gain over the no-query alternative separates from zero, per defense."""
    parts = []
    for defense in defenses:
        measured = [
            (attack, group.interval(GAIN_RECOVERED))
            for attack in attacks
            if (group := groups.get(GroupKey(victim, defense, attack, budget))) is not None
        ]
        measured = [(attack, gain) for attack, gain in measured if gain is not None]
        if measured:
            names = [attack for attack, gain in measured if above(gain, 0.0)]
            parts.append(f"under {defense}: {', '.join(names) or 'no attack'}")
    if not parts:
        return None
    return (
        f"- {budget_text(budget)}, stealing gain over the no-query alternative above 0 (interval): "
        + "; ".join(parts)
        + "."
    )


def verdicts_markdown(groups: dict[GroupKey, CellGroup], victim: str) -> list[str]:
    """Per budget: the defenses that lower each attack's success (transform-invariant) and quality
    relative to ``none``, the attacks ahead of others, and the gains above 0: only where the 95 %
    intervals separate; with one seed, a sentence saying that nothing is marked significant."""
    mine = {key: group for key, group in groups.items() if key.victim == victim}
    if not mine:
        return []
    out = [f"### Verdicts ({CONFIDENCE * 100:.0f} % intervals separate)", ""]
    if not any_interval(mine.values()):
        return [
            *out,
            "One seed per cell: no intervals exist, so no attack or defense is marked better than another.",
            "",
        ]
    defenses = list(dict.fromkeys(key.defense for key in mine))
    attacks = list(dict.fromkeys(key.attack for key in mine))
    families = list(dict.fromkeys(group.family for group in mine.values()))
    for budget in sorted({key.budget for key in mine}):
        for family in families:
            of_family = [
                a for a in attacks if any(g.family is family for k, g in mine.items() if k.attack == a)
            ]
            for metric in (INVARIANT_SUCCESS, QUALITY):
                label = metric.label(family)
                for line in (
                    _defense_lines(mine, victim, defenses, of_family, budget, metric, label),
                    _attack_lines(mine, victim, defenses, of_family, budget, metric, label),
                ):
                    if line:
                        out.append(line)
            gain = _gain_line(mine, victim, defenses, of_family, budget)
            if gain:
                out.append(gain)
    unmeasured = sum(1 for group in mine.values() if len(group.lines) < 2)
    if unmeasured:
        out.append(
            f"- {unmeasured} of {len(mine)} cells have one seed: no interval, never called better or worse."
        )
    return [*out, ""]


def _metrics_of(family: type[RunResult], groups: list[CellGroup]) -> list[tuple[Metric, int, float, str]]:
    """The tables of a family: (metric, digits, scale, unit)."""
    metrics: list[tuple[Metric, int, float, str]] = [(QUALITY, 3, 1.0, "")]
    if has_invariant_success(family):
        metrics.append((INVARIANT_SUCCESS, 3, 1.0, ""))
    if any(group.interval(GAIN_RECOVERED) is not None for group in groups):
        metrics.append((GAIN_RECOVERED, 0, 100.0, " %"))
    if any(group.interval(BASELINE_QUALITY) is not None for group in groups):
        metrics.append((BASELINE_QUALITY, 3, 1.0, ""))
    metrics.append((SUCCESS, 3, 1.0, ""))
    return metrics


def _victim_tables(victim: str, lines: list[CellLine], groups: dict[GroupKey, CellGroup]) -> list[str]:
    """Per family of the victim's attacks, one table per metric (rows attacks, columns defenses,
    each cell mean ± half-width (n) at every budget); failed cells in the first."""
    of_victim = [line for line in lines if line.victim == victim]
    defenses = list(dict.fromkeys(line.defense for line in of_victim))
    mine = [group for key, group in groups.items() if key.victim == victim]
    out: list[str] = []
    families = list(dict.fromkeys(group.family for group in mine))
    for family in families:
        of_family = [group for group in mine if group.family is family]
        name = of_family[0].results[0].family
        attacks = list(  # an attack whose every cell failed still gets its row of errors
            dict.fromkeys(
                [group.key.attack for group in of_family]
                + [line.attack for line in of_victim if not line.ok and line.family == name]
            )
        )
        victim_scores = [
            r.victim_quality for g in of_family for r in g.results if r.victim_quality is not None
        ]
        for index, (metric, digits, scale, unit) in enumerate(_metrics_of(family, of_family)):
            title = f"**{metric.label(family)}**"
            if metric is QUALITY and victim_scores:
                low, high = min(victim_scores), max(victim_scores)
                spread = "" if high - low < 5e-4 else f" (from {low:.3f} to {high:.3f} over its cells)"
                title += f"; the victim scores {sum(victim_scores) / len(victim_scores):.3f}{spread}"
            out += [
                title,
                "",
                "| attack | " + " | ".join(defenses) + " |",
                "|---" * (len(defenses) + 1) + "|",
            ]
            for attack in attacks:
                cells = []
                for defense in defenses:
                    parts = []
                    budgets = sorted(
                        {
                            line.budget
                            for line in of_victim
                            if line.attack == attack and line.defense == defense
                        }
                    )
                    for budget in budgets:
                        group = groups.get(GroupKey(victim, defense, attack, budget))
                        interval = None if group is None else group.interval(metric)
                        text = f"{budget_text(budget)}: " + (
                            "-" if interval is None else interval.text(digits, scale, unit)
                        )
                        if index == 0:
                            bad = [
                                line
                                for line in of_victim
                                if not line.ok
                                and (line.attack, line.defense, line.budget) == (attack, defense, budget)
                            ]
                            if bad and group is None:
                                code = bad[0].error_code or "failed"
                                text = f"{budget_text(budget)}: **{code}** (n {len(bad)})"
                            elif bad:
                                text += f" + {len(bad)} failed"
                        parts.append(text)
                    cells.append("<br>".join(parts) or "-")
                out.append(f"| {attack} | " + " | ".join(cells) + " |")
            out.append("")
    return out


def _audit_markdown(lines: list[CellLine]) -> list[str]:
    """Queries per key, aggregated over seeds: images charged and seconds (mean ± interval, n keys)."""
    out = [
        "## Queries per key (audit streams)",
        "",
        "Images charged to each cell's key and seconds from its first to its last charge, over seeds.",
        "",
        "| victim | defense | attack | budget | images charged | seconds | flags |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key: dict[GroupKey, list[CellLine]] = {}
    for line in lines:
        by_key.setdefault(GroupKey(line.victim, line.defense, line.attack, line.budget), []).append(line)
    for key, group in by_key.items():
        audits = [line.audit for line in group if line.audit is not None]
        images = t_interval(float(a.images) for a in audits)
        seconds = t_interval(a.seconds for a in audits)
        flag_counts: dict[str, int] = {}
        for line in group:
            for model, flag in line.flags.items():
                name = f"{model}: {flag.flag}"
                flag_counts[name] = flag_counts.get(name, 0) + 1
        flags = ", ".join(f"{name} (x{count})" for name, count in flag_counts.items()) or "-"
        images_text = "-" if images is None else images.text(0)
        seconds_text = "-" if seconds is None else seconds.text(1)
        out.append(
            f"| {key.victim} | {key.defense} | {key.attack} | {budget_text(key.budget)} | "
            f"{images_text} | {seconds_text} | {flags} |"
        )
    return [*out, ""]


def markdown(run_dir: Path, lines: list[CellLine]) -> str:
    costs = _costs(run_dir)
    ok = [line for line in lines if line.ok]
    failed = [line for line in lines if not line.ok]
    groups = aggregate(ok)
    name = ok[0].scenario if ok else (failed[0].scenario if failed else run_dir.name)
    out = [f"# Range report: {name}", ""]
    out += how_fast_markdown(groups, key_rate(run_dir))
    intro = f"{len(lines)} cells: {len(ok)} finished, {len(failed)} failed."
    out.append(intro + " Queries are those the server charged (its usage), not what the attacker planned.")
    out.append("")
    note = _intervals_note(groups)
    if note:
        out += [note, ""]
    for victim in sorted({line.victim for line in lines}):
        out += [f"## {victim}", ""]
        out += verdicts_markdown(groups, victim)
        out += _victim_tables(victim, lines, groups)
        rows = [line for line in ok if line.victim == victim]
        for cls, family_rows in _by_family(rows).items():
            out += cls.report_notes(family_rows)
        out.append("")
    if costs:
        out += [
            "## Cost to honest users",
            "",
            "Encoders: cosine of defended to undefended embeddings and an honest user's linear probe. "
            "Classifiers: test accuracy with and without the defense, top-1 agreement, L1 distortion. "
            "Measured once per defense (n 1): no interval.",
            "",
            "| served model | defense | cosine / agreement | score | defended score | drop | L1 | n |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for served, cost in costs.items():
            cells = [cost.similarity, cost.score, cost.defended_score, cost.drop, cost.l1]
            out.append(f"| {served} | {cost.defense} | " + " | ".join(fmt(c) for c in cells) + " | 1 |")
        out.append("")
    out += ["## Plots", ""]
    out += [f"![{plot}]({plot})" for plot in PLOTS if (run_dir / plot).is_file()]
    out.append("")
    out += _audit_markdown(lines)
    if failed:
        out += ["## Failed cells", ""]
        out += [f"- `{line.cell}`: {line.error}" for line in failed]
        out.append("")
    if ok:
        legends = [cls.legend for cls in _by_family(ok)]
        out += [
            "<details><summary>Cells, seed by seed</summary>",
            "",
            "Each: " + "; ".join(legends) + ".",
            "",
        ]
        out += [
            f"- `{line.cell}` (seed {line.seed}): {_result(line).cell_text(budget_text(line.budget))}"
            for line in ok
        ]
        out += ["", "</details>", ""]
    wall = sum(line.wall_seconds for line in lines)
    out += [f"Cells' wall time: {wall:.0f} s in all."]
    return "\n".join(out) + "\n"


def _curve_metrics(ok: list[CellLine]) -> list[Metric]:
    """The rows of ``quality_vs_queries.png``: success, the transform-invariant success (where a
    family measures one), quality, and the share of the victim's gain recovered (where measured)."""
    families = list(_by_family(ok))
    metrics = [SUCCESS]
    if any(has_invariant_success(cls) for cls in families):
        metrics.append(INVARIANT_SUCCESS)
    metrics.append(QUALITY)
    if any(_result(line).gain_recovered is not None for line in ok):
        metrics.append(GAIN_RECOVERED)
    return metrics


def plots(run_dir: Path, lines: list[CellLine]) -> None:
    """Write the three PNGs (see the module docstring): means over seeds with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [line for line in lines if line.ok]
    if not ok:
        return
    groups = aggregate(ok)
    attacks = list(dict.fromkeys(line.attack for line in ok))
    defenses = list(dict.fromkeys(line.defense for line in ok))
    victims = list(dict.fromkeys(line.victim for line in ok))
    colors = {d: plt.cm.tab10(i % 10) for i, d in enumerate(defenses)}
    metrics = _curve_metrics(ok)

    def err(interval: Interval | None) -> float:
        return 0.0 if interval is None or interval.half_width is None else interval.half_width

    fig, axes = plt.subplots(
        len(metrics),
        len(attacks),
        figsize=(4.2 * len(attacks), 3.2 * len(metrics)),
        squeeze=False,
        sharex="col",
    )
    for j, attack in enumerate(attacks):
        of_attack = [group for key, group in groups.items() if key.attack == attack]
        family = of_attack[0].family
        for defense in defenses:
            for victim in victims:
                series = sorted(
                    (g for g in of_attack if g.key.defense == defense and g.key.victim == victim),
                    key=lambda g: g.key.budget,
                )
                if not series:
                    continue
                label = defense if len(victims) == 1 else f"{defense} ({victim})"
                x = [q.mean for g in series if (q := g.interval(QUERIES)) is not None]
                for i, metric in enumerate(metrics):
                    points = [
                        (xi, iv)
                        for xi, g in zip(x, series, strict=True)
                        if (iv := g.interval(metric)) is not None
                    ]
                    if points:
                        axes[i][j].errorbar(
                            [p[0] for p in points],
                            [p[1].mean for p in points],
                            yerr=[err(p[1]) for p in points],
                            fmt="o-",
                            capsize=3,
                            color=colors[defense],
                            label=label,
                        )
        for i, metric in enumerate(metrics):
            axes[i][j].set_ylabel(metric.label(family))
            axes[i][j].grid(alpha=0.3)
            if metric is QUALITY:
                victim_quality = [
                    v for g in of_attack for r in g.results if (v := r.victim_quality) is not None
                ]
                if victim_quality:
                    axes[i][j].axhline(max(victim_quality), color="k", ls="--", lw=1, label="victim")
            if metric is GAIN_RECOVERED:
                for target in (0.5, 0.9):
                    axes[i][j].axhline(target, color="grey", ls=":", lw=1)
        axes[0][j].set_title(attack)
        axes[-1][j].set_xlabel("queries spent (server usage)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"Attack success and stolen quality vs queries, per defense (mean, {CONFIDENCE * 100:.0f} % interval)"
    )
    fig.tight_layout()
    fig.savefig(run_dir / "quality_vs_queries.png", dpi=110)
    plt.close(fig)

    costs = _costs(run_dir)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    markers = "osD^v<>p*h"
    for i, attack in enumerate(attacks):
        for victim in victims:
            for defense in defenses:
                series = [
                    g
                    for key, g in groups.items()
                    if (key.victim, key.attack, key.defense) == (victim, attack, defense)
                ]
                if not series:
                    continue
                top = max(series, key=lambda g: g.key.budget)
                cost = cost_of(costs, top.lines[0])
                success = top.interval(INVARIANT_SUCCESS)
                if cost is None or success is None:
                    continue
                ax.errorbar(
                    cost,
                    success.mean,
                    yerr=err(success),
                    color=colors[defense],
                    marker=markers[i % len(markers)],
                    ms=7,
                    capsize=3,
                )
                ax.annotate(
                    f"{defense}/{attack}",
                    (cost, success.mean),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
    ax.set_xlabel("cost to honest users (accuracy or linear-probe accuracy drop)")
    success_labels = ", ".join(dict.fromkeys(invariant_label(cls) for cls in _by_family(ok)))
    ax.set_ylabel(f"attack success at the largest budget ({success_labels})", fontsize=8)
    ax.set_title("Defense trade-off: low and to the left is better")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "tradeoff.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for line in lines:
        audit_series = [] if line.audit is None else line.audit.series
        if audit_series:
            t, n = zip(*audit_series, strict=True)
            ax.plot(t, n, color=colors.get(line.defense, "grey"), alpha=0.7, lw=1)
    for defense in defenses:
        ax.plot([], [], color=colors[defense], label=defense)
    ax.set_xlabel("seconds since the key's first charge")
    ax.set_ylabel("images charged (cumulative)")
    ax.set_title("Queries over time, one line per key")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "audit.png", dpi=110)
    plt.close(fig)


PROTECTION_PLOT = "protection.png"


def read_protection(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished data-protection cell (``protection/<cell>/evaluation.json``)."""
    return [json.loads(p.read_text()) for p in sorted((run_dir / "protection").glob("*/evaluation.json"))]


def protection_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The Self-Ensemble Protection table: clean test accuracy after training on each copy."""
    out = [
        "## Data protection (Self-Ensemble Protection)",
        "",
        "Clean test accuracy of a fresh model trained on the protected copy, on the clean data and on "
        "uniform noise of the same eps (Chen et al., ICLR 2023: protection works when the first is far "
        "below the other two).",
        "",
        "| method | eps | images | protected | clean | noise | protected / clean |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["protected"] / r["clean"] if r["clean"] else None
        out.append(
            f"| {r['method']} | {r['eps'] * 255:.0f}/255 | {r['images']} | {fmt(r['protected'])} | "
            f"{fmt(r['clean'])} | {fmt(r['random_noise'])} | {fmt(ratio, 2)} |"
        )
    return [*out, "", f"![{PROTECTION_PLOT}]({PROTECTION_PLOT})", ""]


def protection_plot(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 4))
    width = 0.26
    for i, (key, label) in enumerate(
        (("clean", "clean data"), ("random_noise", "random noise"), ("protected", "protected"))
    ):
        ax.bar([j + (i - 1) * width for j in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['method']}\n{r['eps'] * 255:.0f}/255" for r in rows])
    ax.set_ylabel("clean test accuracy of a model trained on it")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Self-Ensemble Protection")
    fig.tight_layout()
    fig.savefig(run_dir / PROTECTION_PLOT, dpi=110)
    plt.close(fig)


def build_report(run_dir: str | Path) -> Path:
    """Rebuild ``report.md`` and the plots of ``run_dir`` from its ``results.jsonl`` (and its
    data-protection cells)."""
    run_dir = Path(run_dir)
    lines = read_results(run_dir)
    protection = read_protection(run_dir)
    if not lines and not protection:
        raise FileNotFoundError(f"no results in {run_dir / RESULTS_FILE}")
    path = run_dir / REPORT_FILE
    if lines:  # the plots first: the report links those that exist
        plots(run_dir, lines)
    text = markdown(run_dir, lines) if lines else f"# Range report: {run_dir.name}\n\n"
    if protection:
        protection_plot(run_dir, protection)
        text += "\n" + "\n".join(protection_markdown(protection))
    path.write_text(text)
    return path

"""The range's report, rebuilt from ``results.jsonl`` alone (``stealrange report runs/<name>``).

The lines are read back through their models (:mod:`experiments.results`); everything a table
cell, a note or a plot shows of a cell comes from its family's typed result
(:class:`attacker_client.runs.RunResult`: its success metric and label, the surrogate's and the
victim's quality, its cell text, its notes), so the report knows no family by name.

``report.md`` holds, per victim, a table with attacks as rows and defenses as columns, each cell
giving at every budget the result's cell text (encoders: the surrogate's linear-probe accuracy /
the victim's and its cosine fidelity; classifiers: agreement with the victim and test accuracy, for
ensembles also the single network's agreement; robustness stealing: the student's PGD and clean
accuracy next to PGD-AT), then each family's notes (an untrained surrogate's cosine; the victim's
accuracy and the ensembles' diversity table); the defenses' cost to honest users; failed cells with
their errors; and the queries each key spent over time. Plots (PNG, matplotlib):

- ``quality_vs_queries.png``: attack success and the stolen model's quality against queries spent,
  one line per defense, one column per attack (each axis labelled by the attack's family);
- ``tradeoff.png``: attack success at the largest budget against the defense's cost to honest
  users (the trade-off frontier: a good defense sits low and to the left);
- ``audit.png``: cumulative images charged against time, per key (from its audit stream).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from attacker_client.runs import RunResult, budget_text, fmt
from experiments.results import RESULTS_FILE, CellLine, read_results

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


def markdown(run_dir: Path, lines: list[CellLine]) -> str:
    costs = _costs(run_dir)
    ok = [line for line in lines if line.ok]
    failed = [line for line in lines if not line.ok]
    name = ok[0].scenario if ok else (failed[0].scenario if failed else run_dir.name)
    out = [f"# Range report: {name}", ""]
    legends = [cls.legend for cls in _by_family(ok)]
    intro = f"{len(lines)} cells: {len(ok)} finished, {len(failed)} failed."
    if legends:
        intro += " Each table cell, at every budget: " + "; ".join(legends) + "."
    out.append(intro + " Queries are those the server charged (its usage), not what the attacker planned.")
    out.append("")
    for victim in sorted({line.victim for line in lines}):
        rows = [line for line in ok if line.victim == victim]
        defenses = list(dict.fromkeys(line.defense for line in lines if line.victim == victim))
        attacks = list(dict.fromkeys(line.attack for line in lines if line.victim == victim))
        out += [
            f"## {victim}",
            "",
            "| attack | " + " | ".join(defenses) + " |",
            "|---" * (len(defenses) + 1) + "|",
        ]
        for attack in attacks:
            cells = []
            for defense in defenses:
                parts = [
                    _result(line).cell_text(budget_text(line.budget))
                    for line in sorted(
                        (r for r in rows if r.attack == attack and r.defense == defense),
                        key=lambda r: r.budget,
                    )
                ]
                for line in failed:
                    if line.victim == victim and line.attack == attack and line.defense == defense:
                        parts.append(f"{budget_text(line.budget)}: **{line.error_code or 'failed'}**")
                cells.append("<br>".join(parts) or "-")
            out.append(f"| {attack} | " + " | ".join(cells) + " |")
        for cls, family_rows in _by_family(rows).items():
            out += cls.report_notes(family_rows)
        out.append("")
    if costs:
        out += [
            "## Cost to honest users",
            "",
            "Encoders: cosine of defended to undefended embeddings and an honest user's linear probe. "
            "Classifiers: test accuracy with and without the defense, top-1 agreement, L1 distortion.",
            "",
            "| served model | defense | cosine / agreement | score | defended score | drop | L1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for served, cost in costs.items():
            cells = [cost.similarity, cost.score, cost.defended_score, cost.drop, cost.l1]
            out.append(f"| {served} | {cost.defense} | " + " | ".join(fmt(c) for c in cells) + " |")
        out.append("")
    out += ["## Plots", ""]
    out += [f"![{plot}]({plot})" for plot in PLOTS if (run_dir / plot).is_file()]
    out.append("")
    out += ["## Queries per key (audit streams)", "", "| cell | images charged | events | seconds | flags |"]
    out.append("|---|---|---|---|---|")
    for line in lines:
        audit = line.audit
        flags = ", ".join(f"{m}: {f.flag}" for m, f in line.flags.items()) or "-"
        images, events, seconds = (
            ("-", "-", None) if audit is None else (audit.images, audit.events, audit.seconds)
        )
        out.append(f"| {line.cell} | {images} | {events} | {fmt(seconds, 1)} | {flags} |")
    if failed:
        out += ["", "## Failed cells", ""]
        out += [f"- `{line.cell}`: {line.error}" for line in failed]
    wall = sum(line.wall_seconds for line in lines)
    out += ["", f"Cells' wall time: {wall:.0f} s in all."]
    return "\n".join(out) + "\n"


def plots(run_dir: Path, lines: list[CellLine]) -> None:
    """Write the three PNGs (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [line for line in lines if line.ok]
    if not ok:
        return
    attacks = list(dict.fromkeys(line.attack for line in ok))
    defenses = list(dict.fromkeys(line.defense for line in ok))
    colors = {d: plt.cm.tab10(i % 10) for i, d in enumerate(defenses)}

    fig, axes = plt.subplots(2, len(attacks), figsize=(4.2 * len(attacks), 6.5), squeeze=False, sharex="col")
    for j, attack in enumerate(attacks):
        of_attack = [line for line in ok if line.attack == attack]
        for defense in defenses:
            series: dict[str, list[CellLine]] = defaultdict(list)
            for line in of_attack:
                if line.defense == defense:
                    series[line.victim].append(line)
            for victim, rows in series.items():
                rows.sort(key=lambda r: _result(r).queries.spent)
                x = [_result(r).queries.spent for r in rows]
                label = defense if len(series) == 1 else f"{defense} ({victim})"
                axes[0][j].plot(
                    x, [_result(r).success for r in rows], "o-", color=colors[defense], label=label
                )
                axes[1][j].plot(
                    x, [_result(r).quality for r in rows], "o-", color=colors[defense], label=label
                )
        victim_quality = [v for v in (_result(line).victim_quality for line in of_attack) if v is not None]
        if victim_quality:
            axes[1][j].axhline(max(victim_quality), color="k", ls="--", lw=1, label="victim")
        family = type(_result(of_attack[0]))
        axes[0][j].set_title(attack)
        axes[0][j].set_ylabel(family.success_label)
        axes[1][j].set_ylabel(family.quality_label)
        axes[1][j].set_xlabel("queries spent (server usage)")
        axes[0][j].grid(alpha=0.3)
        axes[1][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Surrogate quality vs queries, per defense")
    fig.tight_layout()
    fig.savefig(run_dir / "quality_vs_queries.png", dpi=110)
    plt.close(fig)

    costs = _costs(run_dir)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    markers = "osD^v<>p*h"
    for i, attack in enumerate(attacks):
        for defense in defenses:
            rows = [r for r in ok if r.attack == attack and r.defense == defense]
            if not rows:
                continue
            top = max(rows, key=lambda r: r.budget)
            cost, success = cost_of(costs, top), _result(top).success
            if cost is None or success is None:
                continue
            ax.scatter(cost, success, color=colors[defense], marker=markers[i % len(markers)], s=60)
            ax.annotate(
                f"{defense}/{attack}", (cost, success), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
    ax.set_xlabel("cost to honest users (accuracy or linear-probe accuracy drop)")
    success_labels = ", ".join(dict.fromkeys(cls.success_label for cls in _by_family(ok)))
    ax.set_ylabel(f"attack success at the largest budget ({success_labels})")
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
    text = markdown(run_dir, lines) if lines else f"# Range report: {run_dir.name}\n\n"
    if lines:
        plots(run_dir, lines)
    if protection:
        protection_plot(run_dir, protection)
        text += "\n" + "\n".join(protection_markdown(protection))
    path.write_text(text)
    return path

"""The range's report, rebuilt from ``results.jsonl`` alone (``stealrange report runs/<name>``).

``report.md`` holds, per victim, a table with attacks as rows and defenses as columns, each cell
giving at every budget the surrogate's linear-probe accuracy / the victim's, and the surrogate's
cosine fidelity to the victim (encoders), or its agreement with the victim and test accuracy
(classifiers; for ensembles also the single network's agreement and the members' diversity); the
defenses' cost to honest users; failed cells with their errors; and the queries each key spent
over time. Plots (PNG, matplotlib):

- ``quality_vs_queries.png``: surrogate quality against queries spent, one line per defense, one
  column per attack (fidelity or agreement on top, linear probe or test accuracy below);
- ``tradeoff.png``: attack success at the largest budget against the defense's cost to honest
  users (the trade-off frontier: a good defense sits low and to the left);
- ``audit.png``: cumulative images charged against time, per key (from its audit stream).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.md"
PLOTS = ("quality_vs_queries.png", "tradeoff.png", "audit.png")


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of ``results.jsonl``; a later line for the same cell replaces an earlier one."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    lines: dict[str, dict[str, Any]] = {}
    for text in path.read_text().splitlines():
        if text.strip():
            line = json.loads(text)
            lines[line["cell"]] = line
    return list(lines.values())


def _first(scores: dict[str, dict[str, float]] | None, metric: str) -> float | None:
    """``metric`` on the first downstream set (the victim's own task comes first by default)."""
    if not scores:
        return None
    return next(iter(scores.values())).get(metric)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _budget(b: int) -> str:
    return f"{b // 1000}k" if b >= 1000 and b % 1000 == 0 else str(b)


def _costs(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "costs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _served(line: dict[str, Any]) -> str:
    return line["victim"] if line["defense"] == "none" else f"{line['victim']}--{line['defense']}"[:64]


def cost_of(costs: dict[str, Any], line: dict[str, Any]) -> float | None:
    """The defense's cost to honest users: their linear-probe accuracy drop (encoders)."""
    cost = costs.get(_served(line))
    return None if cost is None else cost.get("linear_probe_drop", cost.get("accuracy_drop"))


def is_classifier(line: dict[str, Any]) -> bool:
    return line.get("kind") == "classifier"


def is_robustness(line: dict[str, Any]) -> bool:
    return line.get("kind") == "robustness"


def fidelity_of(line: dict[str, Any]) -> float | None:
    """Attack success: agreement with the victim (classifiers), cosine fidelity (encoders), the
    student's PGD accuracy (robustness stealing)."""
    if is_classifier(line):
        return (line.get("surrogate") or {}).get("agreement")
    if is_robustness(line):
        return (line.get("surrogate") or {}).get("pgd_accuracy")
    return (line.get("fidelity") or {}).get("cosine")


def quality_of(line: dict[str, Any]) -> float | None:
    """The surrogate's own task score: test accuracy (classifiers, RRM students), linear probe."""
    if is_classifier(line):
        return (line.get("surrogate") or {}).get("accuracy")
    if is_robustness(line):
        return (line.get("surrogate") or {}).get("clean_accuracy")
    return _first(line.get("surrogate"), "linear_probe")


def victim_quality_of(line: dict[str, Any]) -> float | None:
    """The victim's score on the same task."""
    if is_classifier(line) or is_robustness(line):
        return (line.get("victim_quality") or {}).get(
            "accuracy", (line.get("victim_quality") or {}).get("test_accuracy")
        )
    return _first(line.get("victim_quality"), "linear_probe")


def _cell_text(line: dict[str, Any]) -> str:
    budget = _budget(line["budget"])
    if is_robustness(line):
        s = line.get("surrogate") or {}
        text = f"{budget}: PGD {_fmt(s.get('pgd_accuracy'))}, clean {_fmt(s.get('clean_accuracy'))}"
        at = (line.get("references") or {}).get("pgd_at")
        if at:
            time_ratio = (line.get("ratios") or {}).get("train_time_vs_pgd_at")
            text += f" (PGD-AT {_fmt(at.get('pgd_accuracy'))}, time x{_fmt(time_ratio, 2)})"
        return text
    if is_classifier(line):
        text = f"{budget}: agr {_fmt(fidelity_of(line))}, acc {_fmt(quality_of(line))}"
        if len(line.get("members") or []) > 1:
            text += f" (single {_fmt((line.get('single') or {}).get('agreement'))})"
        return text
    return (
        f"{budget}: {_fmt(quality_of(line))} / {_fmt(victim_quality_of(line))}, cos {_fmt(fidelity_of(line))}"
    )


def markdown(run_dir: Path, lines: list[dict[str, Any]]) -> str:
    costs = _costs(run_dir)
    ok = [line for line in lines if line["status"] == "ok"]
    failed = [line for line in lines if line["status"] != "ok"]
    name = ok[0]["scenario"] if ok else (failed[0]["scenario"] if failed else run_dir.name)
    out = [f"# Range report: {name}", ""]
    out.append(
        f"{len(lines)} cells: {len(ok)} finished, {len(failed)} failed. Each table cell, at every budget: "
        "for an encoder victim, the surrogate's linear-probe accuracy / the victim's on the first "
        "downstream set and the surrogate's cosine fidelity to the victim's embeddings on held-out "
        "images; for robustness stealing (RRM), the student's PGD and clean accuracy next to PGD "
        "adversarial training of the same student; for a classifier victim, the surrogate's "
        "agreement with the victim (fidelity) and its "
        "test accuracy on held-out images (for an ensemble: the members' mean probability, and its "
        "single network's agreement). Queries are those the server charged (its usage), not what the "
        "attacker planned."
    )
    out.append("")
    for victim in sorted({line["victim"] for line in lines}):
        rows = [line for line in ok if line["victim"] == victim]
        defenses = list(dict.fromkeys(line["defense"] for line in lines if line["victim"] == victim))
        attacks = list(dict.fromkeys(line["attack"] for line in lines if line["victim"] == victim))
        out += [
            f"## {victim}",
            "",
            "| attack | " + " | ".join(defenses) + " |",
            "|---" * (len(defenses) + 1) + "|",
        ]
        for attack in attacks:
            cells = []
            for defense in defenses:
                parts = []
                for line in sorted(
                    (r for r in rows if r["attack"] == attack and r["defense"] == defense),
                    key=lambda r: r["budget"],
                ):
                    parts.append(_cell_text(line))
                for line in failed:
                    if line["victim"] == victim and line["attack"] == attack and line["defense"] == defense:
                        parts.append(f"{_budget(line['budget'])}: **{line.get('error_code') or 'failed'}**")
                cells.append("<br>".join(parts) or "-")
            out.append(f"| {attack} | " + " | ".join(cells) + " |")
        untrained = [line["untrained_fidelity"]["cosine"] for line in rows if line.get("untrained_fidelity")]
        if untrained:
            out += ["", f"An untrained surrogate scores cos {min(untrained):.3f}-{max(untrained):.3f}."]
        victim_scores = [v for v in (victim_quality_of(line) for line in rows if is_classifier(line)) if v]
        if victim_scores:
            out += ["", f"The victim's test accuracy: {max(victim_scores):.3f}."]
        out += ensemble_table([line for line in rows if len(line.get("members") or []) > 1])
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
            if cost.get("kind") == "classifier":
                cells = [cost.get("agreement"), cost.get("accuracy"), cost.get("defended_accuracy")]
                cells += [cost.get("accuracy_drop"), cost.get("l1")]
            else:
                cells = [cost.get("cosine"), cost.get("linear_probe"), cost.get("defended_linear_probe")]
                cells += [cost.get("linear_probe_drop"), None]
            out.append(f"| {served} | {cost.get('defense')} | " + " | ".join(_fmt(c) for c in cells) + " |")
        out.append("")
    out += ["## Plots", ""]
    out += [f"![{plot}]({plot})" for plot in PLOTS if (run_dir / plot).is_file()]
    out.append("")
    out += ["## Queries per key (audit streams)", "", "| cell | images charged | events | seconds | flags |"]
    out.append("|---|---|---|---|---|")
    for line in lines:
        audit = line.get("audit") or {}
        flags = ", ".join(f"{m}: {f.get('flag')}" for m, f in (line.get("flags") or {}).items()) or "-"
        out.append(
            f"| {line['cell']} | {audit.get('images', '-')} | {audit.get('events', '-')} | "
            f"{_fmt(audit.get('seconds'), 1)} | {flags} |"
        )
    if failed:
        out += ["", "## Failed cells", ""]
        out += [f"- `{line['cell']}`: {line.get('error')}" for line in failed]
    wall = sum(line.get("wall_seconds", 0.0) for line in lines)
    out += ["", f"Cells' wall time: {wall:.0f} s in all."]
    return "\n".join(out) + "\n"


def ensemble_table(rows: list[dict[str, Any]]) -> list[str]:
    """Ensemble stealing: single network vs combination, and the members' diversity (Pape et al.)."""
    if not rows:
        return []
    out = [
        "",
        "Ensembles: agreement of the single network and of the members' mean, and the members' "
        "prediction variance and pairwise disagreement on held-out images.",
        "",
        "| attack | defense | budget | single | combined | gain | variance | disagreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for line in sorted(rows, key=lambda r: (r["attack"], r["defense"], r["budget"])):
        single, combined = (line.get("single") or {}).get("agreement"), fidelity_of(line)
        gain = None if single is None or combined is None else combined - single
        diversity = line.get("diversity") or {}
        out.append(
            f"| {line['attack']} | {line['defense']} | {_budget(line['budget'])} | {_fmt(single)} | "
            f"{_fmt(combined)} | {_fmt(gain)} | {_fmt(diversity.get('variance'), 5)} | "
            f"{_fmt(diversity.get('disagreement'))} |"
        )
    return out


def plots(run_dir: Path, lines: list[dict[str, Any]]) -> None:
    """Write the three PNGs (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [line for line in lines if line["status"] == "ok"]
    if not ok:
        return
    attacks = list(dict.fromkeys(line["attack"] for line in ok))
    defenses = list(dict.fromkeys(line["defense"] for line in ok))
    colors = {d: plt.cm.tab10(i % 10) for i, d in enumerate(defenses)}

    fig, axes = plt.subplots(2, len(attacks), figsize=(4.2 * len(attacks), 6.5), squeeze=False, sharex="col")
    for j, attack in enumerate(attacks):
        for defense in defenses:
            series = defaultdict(list)
            for line in ok:
                if line["attack"] == attack and line["defense"] == defense:
                    series[line["victim"]].append(line)
            for victim, rows in series.items():
                rows.sort(key=lambda r: r["queries"]["spent"])
                x = [r["queries"]["spent"] for r in rows]
                label = defense if len(series) == 1 else f"{defense} ({victim})"
                fidelity = [fidelity_of(r) for r in rows]
                quality = [quality_of(r) for r in rows]
                axes[0][j].plot(x, fidelity, "o-", color=colors[defense], label=label)
                axes[1][j].plot(x, quality, "o-", color=colors[defense], label=label)
        victim_lp = [victim_quality_of(line) for line in ok if line["attack"] == attack]
        if any(v is not None for v in victim_lp):
            axes[1][j].axhline(
                max(v for v in victim_lp if v is not None), color="k", ls="--", lw=1, label="victim"
            )
        classifier = any(is_classifier(line) for line in ok if line["attack"] == attack)
        axes[0][j].set_title(attack)
        axes[0][j].set_ylabel("agreement with the victim" if classifier else "cosine fidelity to the victim")
        axes[1][j].set_ylabel("test accuracy" if classifier else "linear probe accuracy")
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
            rows = [r for r in ok if r["attack"] == attack and r["defense"] == defense]
            if not rows:
                continue
            top = max(rows, key=lambda r: r["budget"])
            cost, cosine = cost_of(costs, top), fidelity_of(top)
            if cost is None or cosine is None:
                continue
            ax.scatter(cost, cosine, color=colors[defense], marker=markers[i % len(markers)], s=60)
            ax.annotate(
                f"{defense}/{attack}", (cost, cosine), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
    ax.set_xlabel("cost to honest users (accuracy or linear-probe accuracy drop)")
    ax.set_ylabel("attack success at the largest budget (cosine fidelity or agreement)")
    ax.set_title("Defense trade-off: low and to the left is better")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "tradeoff.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for line in lines:
        series = (line.get("audit") or {}).get("series") or []
        if series:
            t, n = zip(*series, strict=True)
            ax.plot(t, n, color=colors.get(line["defense"], "grey"), alpha=0.7, lw=1)
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
            f"| {r['method']} | {r['eps'] * 255:.0f}/255 | {r['images']} | {_fmt(r['protected'])} | "
            f"{_fmt(r['clean'])} | {_fmt(r['random_noise'])} | {_fmt(ratio, 2)} |"
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

"""Classifier stealing over HTTP: a single KD surrogate vs. the five UQ ensembles, at several budgets.

Tests the claim of Pape et al. (ESANN 2023): ensembles of possible surrogates bring only marginal
gains in agreement with the victim, and their members' predictions grow alike during training.
It is a hypothesis to measure here, not a target.

Serves the quick victim classifier (``fmnist-classifier``, trained by ``stealrange train-victim
--kind classifier`` if the store lacks it) as its own uvicorn process; every (attack, budget) cell
gets its own API key with exactly that budget and queries the Fashion-MNIST pool the victim never
trained on, through the SDK, for probabilities. Every network trains the same number of optimizer
steps (``--steps``, batch 64, SGD lr 0.02 momentum 0.9, constant lr: Knockoff's released lr 0.01
momentum 0.5 is for 100 epochs and lags at a few hundred steps), so a budget changes the data, not
the compute; members are logged every ``steps / 10`` steps on 500
held-out test images. Scores on 2,000 held-out test images against the white-box victim: agreement,
accuracy, KL(victim || surrogate). Prints, per budget, KD (Knockoff, one network), and per UQ method
the single network's and the combination's agreement, the gain, and the members' final prediction
variance; writes ``results.json`` and ``steal_classifiers.png`` (agreement vs. budget; variance vs.
iterations) under ``--out``.

    .venv/bin/python benchmarks/steal_classifiers.py [--budgets 1000 5000 20000] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from attacker_client.evaluate_classifier import ClassifierEvalSpec
from attacker_client.steal_classifier import ClassifierStealingConfig, steal_classifier
from attacker_client.uq import UQ_METHODS
from experiments.victim_process import victim_process
from victims.recipes import recipe_for, train_victim

MODEL = "fmnist-classifier"
ADMIN_TOKEN = secrets.token_urlsafe(32)  # a fresh random token per run: no secret has a default


def make_key(url: str, name: str, budget: int) -> str:
    response = httpx.post(
        f"{url}/admin/keys",
        json={"budget": budget, "name": name[:64]},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    response.raise_for_status()
    return response.json()["api_key"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per network")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=UQ_METHODS.names())
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-steal-classifiers"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("STEALRANGE_NO_PROGRESS", "1")

    train_victim(recipe_for("classifier", "quick"), args.store)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    cells = [("knockoff", None), *[("ensemble", m) for m in args.methods]]
    rows: list[dict[str, Any]] = []
    env = {"STEALRANGE_ADMIN_TOKEN": ADMIN_TOKEN, "STEALRANGE_REDIS_PREFIX": f"bench{os.getpid()}"}
    started = time.perf_counter()
    with victim_process(args.store, None, env=env) as url:
        for budget in args.budgets:
            for attack, method in cells:
                label = method or "kd"
                params: dict[str, Any] = {
                    "epochs": 10_000,
                    "max_steps": args.steps,
                    "lr_step": None,
                    "lr": 0.02,
                    "momentum": 0.9,
                    "monitor_every": max(1, args.steps // 10),
                }
                if method is not None:
                    params |= {"method": method, "members": args.members}
                    if method == "swag":  # ~20 snapshots over the second half of the steps
                        params["method_params"] = {"collect_every": max(1, args.steps // 40)}
                config = ClassifierStealingConfig(
                    url=url,
                    key=make_key(url, f"{label}-{budget}", budget),
                    model=MODEL,
                    attack=attack,
                    params=params,
                    query_set="fashion_mnist",
                    query_split="attacker",
                    budget=budget,
                    out=args.out / f"{label}-{budget}",
                    device=args.device,
                    victim_checkpoint=args.store / MODEL,
                    evaluation=ClassifierEvalSpec(test_size=2000, monitor_size=500),
                    progress=False,
                )
                t0 = time.perf_counter()
                record = steal_classifier(config)
                evaluation = record.evaluation
                row = {
                    "method": label,
                    "budget": budget,
                    "spent": record.queries.spent,
                    "single_agreement": evaluation.single.agreement,
                    "combined_agreement": evaluation.combined.agreement,
                    "combined_accuracy": evaluation.combined.accuracy,
                    "combined_kl": evaluation.combined.kl,
                    "member_agreement": [m.agreement for m in evaluation.members],
                    "variance": evaluation.diversity.variance,
                    "disagreement": evaluation.diversity.disagreement,
                    "monitor": [
                        {
                            "iteration": r["iteration"],
                            "variance": r["variance"],
                            "agreement": r.get("combined_agreement"),
                        }
                        for r in record.monitor
                    ],
                    "victim_accuracy": record.victim_quality,
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                print(
                    f"{budget:>6} {label:<14} single {row['single_agreement']:.4f} combined "
                    f"{row['combined_agreement']:.4f} variance {row['variance']:.5f} "
                    f"spent {row['spent']} ({row['seconds']:.0f} s)",
                    flush=True,
                )
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows, args.budgets)
    plot(rows, args.budgets, args.out / "steal_classifiers.png")
    print(f"\n{time.perf_counter() - started:.0f} s in all; {args.out / 'steal_classifiers.png'}")


def print_table(rows: list[dict[str, Any]], budgets: list[int]) -> None:
    print("\nagreement with the victim on 2,000 held-out test images (single network / combination)")
    print(f"{'method':<14}" + "".join(f"{b:>26}" for b in budgets))
    kd = {r["budget"]: r["combined_agreement"] for r in rows if r["method"] == "kd"}
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for budget in budgets:
            r = next(x for x in rows if x["method"] == method and x["budget"] == budget)
            if method == "kd":
                cells.append(f"{r['combined_agreement']:.4f}")
            else:
                gain = r["combined_agreement"] - r["single_agreement"]
                cells.append(f"{r['single_agreement']:.4f}/{r['combined_agreement']:.4f} ({gain:+.4f})")
        print(f"{method:<14}" + "".join(f"{c:>26}" for c in cells))
    print("\ncombination over KD, and the members' final prediction variance / pairwise disagreement")
    for r in rows:
        if r["method"] != "kd":
            print(
                f"{r['budget']:>6} {r['method']:<14} {r['combined_agreement'] / kd[r['budget']]:.4f}x KD; "
                f"variance {r['variance']:.5f}, disagreement {r['disagreement']:.4f}"
            )


def plot(rows: list[dict[str, Any]], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        left.plot(
            [r["budget"] for r in mine],
            [r["combined_agreement"] for r in mine],
            marker="o",
            color=f"C{i}",
            label=method,
        )
        if method != "kd":
            last = max(mine, key=lambda r: r["budget"])
            right.plot(
                [m["iteration"] for m in last["monitor"]],
                [m["variance"] for m in last["monitor"]],
                marker=".",
                color=f"C{i}",
                label=method,
            )
    left.set(xscale="log", xlabel="queries (budget)", ylabel="agreement with the victim", title="fidelity")
    left.legend(fontsize=8)
    right.set(
        xlabel="training iterations",
        ylabel="prediction variance across members",
        title=f"diversity during training ({_budget(max(budgets))} queries)",
    )
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _budget(b: int) -> str:
    return f"{b // 1000}k" if b % 1000 == 0 else str(b)


if __name__ == "__main__":
    main()

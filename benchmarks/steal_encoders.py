"""Encoder stealing over HTTP: RDA vs StolenEncoder vs Cont-Steal at the same query budgets.

Serves the quick victim encoder (``fmnist-encoder``, trained by ``stealrange train-victim --kind
encoder`` if the store lacks it) as its own uvicorn process, gives every (attack, budget) cell its
own API key with exactly that budget, and runs each attack through the SDK. Every surrogate is
scored the same way: cosine fidelity of its embeddings to the victim's on held-out test images,
linear-probe and kNN accuracy on Fashion-MNIST (probe trained on the attacker's pool, tested on the
test split), each as a fraction of the victim's, and the share of the victim's gain over an untrained
network that the surrogate recovered. Queries spent are the server's count.

Protocol: the attacker's query images are the Fashion-MNIST pool the victim never trained on
(``--query-split attacker``); every attack trains the same number of optimiser steps (``--steps``,
batch 100 query samples; RDA's steps see 5 views per sample) with its paper's other defaults; RDA
spends its budget on 10 views of budget/10 samples, the baselines on one query per sample. Prints
the table, then RDA / best baseline at each budget, and writes ``results.json`` and
``steal_encoders.png`` under ``--out``.

    .venv/bin/python benchmarks/steal_encoders.py [--budgets 5000 10000 20000] [--steps 200]
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

from attacker_client.evaluate import EvalConfig
from attacker_client.steal_encoder import EncoderRunResult, EncoderStealingConfig, steal_encoder
from experiments.victim_process import victim_process
from victims.recipes import recipe_for, train_victim

ATTACKS = ("rda", "stolen_encoder", "cont_steal")
MODEL = "fmnist-encoder"
ADMIN_TOKEN = secrets.token_urlsafe(32)  # a fresh random token per run: no secret has a default


def make_key(url: str, budget: int) -> str:
    response = httpx.post(
        f"{url}/admin/keys",
        json={"budget": budget, "name": f"bench-{budget}"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    response.raise_for_status()
    return response.json()["api_key"]


def row_of(attack: str, budget: int, record: EncoderRunResult | None) -> dict[str, Any]:
    assert record is not None  # one process: rank 0
    evaluation = record.evaluation
    assert evaluation.ratio and evaluation.victim and evaluation.untrained  # the victim's checkpoint is given
    assert evaluation.fidelity and evaluation.untrained_fidelity
    ratio = evaluation.ratio["fashion_mnist"]
    recovered = (evaluation.recovered or {}).get("fashion_mnist", {})
    return {
        "attack": attack,
        "budget": budget,
        "samples": record.samples,
        "spent": record.queries.spent,
        "cosine": evaluation.fidelity.cosine,
        "untrained_cosine": evaluation.untrained_fidelity.cosine,
        "linear_probe": evaluation.surrogate["fashion_mnist"]["linear_probe"],
        "linear_probe_ratio": ratio["linear_probe"],
        "knn_ratio": ratio["knn"],
        "linear_probe_recovered": recovered.get("linear_probe"),
        "victim_linear_probe": evaluation.victim["fashion_mnist"]["linear_probe"],
        "untrained_linear_probe": evaluation.untrained["fashion_mnist"]["linear_probe"],
        "train_seconds": record.seconds.train,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for attack in ATTACKS:
        mine = sorted((r for r in rows if r["attack"] == attack), key=lambda r: r["budget"])
        budgets = [r["budget"] for r in mine]
        axes[0].plot(budgets, [r["cosine"] for r in mine], marker="o", label=attack)
        axes[1].plot(budgets, [r["linear_probe_ratio"] for r in mine], marker="o", label=attack)
    if rows:
        axes[0].axhline(rows[0]["untrained_cosine"], color="grey", linestyle=":", label="untrained")
        untrained = rows[0]["untrained_linear_probe"] / rows[0]["victim_linear_probe"]
        axes[1].axhline(untrained, color="grey", linestyle=":", label="untrained")
    axes[0].set(xlabel="queries (images)", ylabel="cosine fidelity to the victim", title="fidelity")
    axes[1].set(xlabel="queries (images)", ylabel="linear probe / victim's", title="Fashion-MNIST probe")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of every attack")
    parser.add_argument("--probe-epochs", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-steal-encoders"))
    args = parser.parse_args()

    if args.out.exists():  # a previous run's query caches would answer for free
        shutil.rmtree(args.out)
    train_victim(recipe_for("encoder"), args.store)
    evaluation = EvalConfig(downstream=["fashion_mnist"], probe_epochs=args.probe_epochs, mlp_probe=False)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    env = {"STEALRANGE_ADMIN_TOKEN": ADMIN_TOKEN}
    with victim_process(args.store, os.environ.get("STEALRANGE_REDIS_URL"), env=env) as url:
        for budget in args.budgets:
            for attack in args.attacks:
                print(f"-- {attack} at {budget} queries", flush=True)
                record = steal_encoder(
                    EncoderStealingConfig(
                        url=url,
                        key=make_key(url, budget),
                        model=MODEL,
                        attack=attack,
                        params={"epochs": 10_000, "max_steps": args.steps},
                        query_set="fashion_mnist",
                        query_split="attacker",
                        budget=budget,
                        out=args.out / f"{attack}-{budget}",
                        device=args.device,
                        victim_checkpoint=args.store / MODEL,
                        evaluation=evaluation,
                    )
                )
                rows.append(row_of(attack, budget, record))
                print(json.dumps(rows[-1]), flush=True)

    print(
        f"\nvictim linear probe {rows[0]['victim_linear_probe']:.4f}, untrained surrogate "
        f"{rows[0]['untrained_linear_probe']:.4f}; untrained cosine {rows[0]['untrained_cosine']:.3f}"
    )
    header = f"{'attack':<15}{'budget':>7}{'samples':>8}{'spent':>7}{'cosine':>8}{'LP/victim':>10}"
    header += f"{'kNN/victim':>11}{'LP recov.':>10}{'train s':>8}"
    print(header)
    for r in rows:
        recovered = "-" if r["linear_probe_recovered"] is None else f"{r['linear_probe_recovered']:.2f}"
        print(
            f"{r['attack']:<15}{r['budget']:>7}{r['samples']:>8}{r['spent']:>7}{r['cosine']:>8.3f}"
            f"{r['linear_probe_ratio']:>10.3f}{r['knn_ratio']:>11.3f}{recovered:>10}{r['train_seconds']:>8.0f}"
        )
    print("\nRDA over the best baseline at each budget (cosine fidelity; linear-probe ratio):")
    for budget in args.budgets:
        cell = {r["attack"]: r for r in rows if r["budget"] == budget}
        baselines = [r for a, r in cell.items() if a != "rda"]
        if "rda" in cell and baselines:
            best_cos = max(r["cosine"] for r in baselines)
            best_lp = max(r["linear_probe_ratio"] for r in baselines)
            print(
                f"  {budget:>6}: cosine {cell['rda']['cosine'] / best_cos:.3f}x, "
                f"linear probe {cell['rda']['linear_probe_ratio'] / best_lp:.3f}x"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out / "steal_encoders.png")
    print(
        f"\n{time.perf_counter() - started:.0f} s; wrote {args.out / 'results.json'} and steal_encoders.png"
    )


if __name__ == "__main__":
    main()

"""Is a quick victim worth stealing? Its downstream score beside what an attacker has without a query.

For each quick encoder recipe (the supervised backbone, the quick profile's encoder, and the SimCLR
encoder) and each downstream set, the linear-probe accuracy of:

- the victim (white box);
- an untrained surrogate (the attack's architecture, seeded);
- the attacker's no-query alternative: the surrogate architecture trained with SimCLR on the
  attacker's own pool for the steps one attack cell gets (:mod:`attacker_client.no_query`).

over ``--seeds`` seeds (mean and 95 % t interval), with the same evaluation config as the quick
scenario, and the margin ``victim - max(untrained, no-query)``. A victim is worth stealing on a set
when that margin is at least ``--margin`` (8 points) with the whole interval of the best alternative
below ``victim - margin``; the verdict is computed, not written.

    .venv/bin/python benchmarks/victim_worth_stealing.py [--seeds 3] [--steps 150] [--batch 64]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from scipy import stats

from attacker_client.attacks.contract import SURROGATE_MEAN, SURROGATE_STD
from attacker_client.evaluate import EvalConfig, downstream_data, features_of, probe_scores
from attacker_client.no_query import train_no_query_alternative
from attacker_client.runs import query_pool
from common.checkpoints import load_checkpoint
from common.models import build_model
from common.training import TrainConfig
from victims.recipes import quick_recipes, simclr_recipe, train_victim

ROOT = Path(__file__).resolve().parents[1]


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student t interval (nan with one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="no-query SimCLR steps (one attack cell's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--margin", type=float, default=0.08)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--architecture", default="small_cnn")
    args = parser.parse_args()
    torch.set_num_threads(2)
    scenario = yaml.safe_load((ROOT / "experiments/scenarios/quick.yaml").read_text())
    cfg = EvalConfig.model_validate(scenario["evaluation"]["encoder"])
    device = torch.device("cpu")
    recipes = {"supervised": quick_recipes()["encoder"], "simclr": simclr_recipe("quick")}
    rows: list[dict[str, Any]] = []
    for label, recipe in recipes.items():
        started = time.perf_counter()
        card = train_victim(recipe, args.store)
        print(f"victim {card.name} ({label}): ready in {time.perf_counter() - started:.0f} s, {card.metrics}")
        victim, _ = load_checkpoint(args.store / card.name, device)
        spec = card.input
        pool = query_pool(scenario["query_set"], scenario["query_split"], spec, None)
        scores: dict[str, dict[str, list[float]]] = {}
        for name in cfg.downstream:
            train, test = downstream_data(name, spec, cfg)
            row = scores.setdefault(name, {"victim": [], "untrained": [], "no_query": []})
            row["victim"].append(
                probe_scores(features_of(victim, device), train, test, cfg, device)["linear_probe"]
            )
        for seed in range(args.seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                untrained = build_model(
                    "encoder",
                    args.architecture,
                    spec.channels,
                    [SURROGATE_MEAN] * spec.channels,
                    [SURROGATE_STD] * spec.channels,
                    feature_dim=victim.feature_dim,
                )
            train_cfg = TrainConfig(
                epochs=10**6,
                batch_size=args.batch,
                optimizer="adam",
                lr=1e-3,
                weight_decay=1e-4,
                seed=seed,
                max_steps=args.steps,
            )
            t0 = time.perf_counter()
            no_query = train_no_query_alternative(
                pool, args.architecture, victim.feature_dim, train_cfg, False
            )
            print(f"  seed {seed}: no-query SimCLR {args.steps} steps in {time.perf_counter() - t0:.0f} s")
            for name in cfg.downstream:
                train, test = downstream_data(name, spec, cfg)
                for role, model in (("untrained", untrained), ("no_query", no_query)):
                    fn = features_of(model, device)
                    scores[name][role].append(probe_scores(fn, train, test, cfg, device)["linear_probe"])
        for name, row in scores.items():
            victim_mean = row["victim"][0]
            means = {role: interval(values) for role, values in row.items() if role != "victim"}
            best_role = max(means, key=lambda r: means[r][0])
            best, half = means[best_role]
            upper = best + (0.0 if math.isnan(half) else half)
            rows.append(
                {
                    "victim": f"{card.name} ({label})",
                    "set": name,
                    "victim_score": victim_mean,
                    **{role: means[role] for role in means},
                    "margin": victim_mean - best,
                    "worth": victim_mean - upper >= args.margin,
                }
            )
    print()
    print("| victim | downstream | victim | untrained | no-query alternative | margin | worth stealing |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" for k in ("untrained", "no_query")]
        print(
            f"| {r['victim']} | {r['set']} | {r['victim_score']:.3f} | {cells[0]} | {cells[1]} | "
            f"{r['margin']:+.3f} | {'yes' if r['worth'] else 'no'} |"
        )


if __name__ == "__main__":
    main()

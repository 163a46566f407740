"""API throughput with each output defense on vs. off, measured side by side in one run.

Builds a temporary model store holding the quick classifier and encoder once undefended and once
per defense (a copy of the checkpoint under another name, with its ``defenses.json``), serves it as
one uvicorn process, and sends batches of 256 uint8 images over the binary path, interleaving the
models round by round so that drift on the machine hits all of them alike. Prints images/s and the
ratio defended / undefended per defense. Target (issue): every stateless defense >= 0.9.

``--heavy`` adds the defenses that run a model or keep state in Redis (MAD with the last-layer
Jacobian, Adaptive Misinformation, B4B, and the PRADA detector): reported, no target.

    .venv/bin/python benchmarks/defense_overhead.py [--store model_store] [--rounds 8] [--heavy]
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from common.checkpoints import CARD_FILE, read_card
from common.wire import infer_request
from defenses.config import DefenseConfig, write_defense_config
from defenses.output.adaptive_misinformation import MISINFORMATION_FOLDER, train_misinformation_model
from experiments.victim_process import victim_process
from victims.recipes import recipe_for, train_victim

ADMIN_TOKEN = secrets.token_urlsafe(32)  # a fresh random token per run: no secret has a default
DEFENSES: dict[str, list[dict[str, Any]]] = {
    "fmnist-classifier": [
        {"name": "label_only"},
        {"name": "top_k", "k": 3},
        {"name": "rounding", "decimals": 2},
        {"name": "reverse_sigmoid", "beta": 0.7, "gamma": 0.2},
        {"name": "probability_noise", "scale": 0.1},
        {"name": "high_confidence", "cutoff": 0.25},
    ],
    "fmnist-encoder": [
        {"name": "embedding_noise", "sigma": 0.1},
        {"name": "embedding_rounding", "decimals": 1},
        {"name": "embedding_top_k", "k": 64},
    ],
}
# Entries are a defense spec, or {"detector": spec} for a detector on an undefended model.
HEAVY: dict[str, list[dict[str, Any]]] = {
    "fmnist-classifier": [
        {"name": "mad", "jacobian": "last_layer"},
        {"name": "adaptive_misinformation"},
        {"detector": {"name": "prada"}},
    ],
    "fmnist-encoder": [{"name": "b4b"}, {"detector": {"name": "prada"}}],
}


def build_store(
    source: Path, defenses: dict[str, list[dict[str, Any]]]
) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A store with every model undefended and once per defense; returns (store, name -> (base, defense))."""
    store = Path(tempfile.mkdtemp(prefix="defense-overhead-"))
    served: dict[str, tuple[str, str]] = {}
    for base, specs in defenses.items():
        shutil.copytree(source / base, store / base)
        served[base] = (base, "none")
        for i, spec in enumerate(specs):
            name = f"{base}-d{i}"
            shutil.copytree(source / base, store / name)
            card = read_card(store / name).model_copy(update={"name": name})
            (store / name / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
            config = (
                DefenseConfig(detector=spec["detector"])
                if "detector" in spec
                else DefenseConfig(default=[spec])
            )
            write_defense_config(store / name, config)
            served[name] = (base, json.dumps(spec))
    return store, served


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per model per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--heavy", action="store_true", help="also MAD, Adaptive Misinformation, B4B, PRADA")
    args = parser.parse_args()

    for kind in ("classifier", "encoder"):
        train_victim(recipe_for(kind), args.store)
    defenses = {base: [*specs, *(HEAVY[base] if args.heavy else [])] for base, specs in DEFENSES.items()}
    if args.heavy and not (args.store / "fmnist-classifier" / MISINFORMATION_FOLDER).is_dir():
        train_misinformation_model(args.store / "fmnist-classifier")
    store, served = build_store(args.store, defenses)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 1, 28, 28), dtype=np.uint8)
    env = {"STEALRANGE_TORCH_THREADS": str(args.threads), "STEALRANGE_ADMIN_TOKEN": ADMIN_TOKEN}
    seconds = dict.fromkeys(served, 0.0)
    try:
        with victim_process(store, None, env=env) as url:
            key = httpx.post(
                f"{url}/admin/keys", json={"budget": -1}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            ).json()["api_key"]
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120
            ) as client:

                def send(name: str) -> None:
                    output = "embedding" if served[name][0].endswith("encoder") else "probabilities"
                    body, headers = infer_request(images, [output], binary=True)
                    client.post(f"/v2/models/{name}/infer", content=body, headers=headers).raise_for_status()

                for name in served:  # warm-up
                    send(name)
                for _ in range(args.rounds):
                    for name in served:
                        started = time.perf_counter()
                        for _ in range(args.requests):
                            send(name)
                        seconds[name] += time.perf_counter() - started
    finally:
        shutil.rmtree(store, ignore_errors=True)

    total = args.rounds * args.requests * args.batch
    rate = {name: total / s for name, s in seconds.items()}
    print(f"\ndefense_overhead: batch {args.batch}, {args.threads} torch threads, {total} images per model")
    for name, (base, spec) in served.items():
        ratio = rate[name] / rate[base]
        heavy = any(json.dumps(h) == spec for h in HEAVY[base])
        flag = "" if spec == "none" or heavy or ratio >= 0.9 else "   (below 0.9)"
        print(f"  {base:<18} {spec:<58} {rate[name]:8.0f} img/s   ratio {ratio:.3f}{flag}")


if __name__ == "__main__":
    main()

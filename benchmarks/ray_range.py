"""The range's tiny scenario on Ray with 1 and 2 workers, and on the local executor, side by side in
one run: wall time of each whole ``run_scenario`` (its victim API and Ray instance started and
stopped inside it), and the ratio 1 worker / 2 workers.

The scenario is the range tests' tiny one (an untrained small encoder on synthetic images, no
defense and embedding noise, StolenEncoder and RDA at 40 and 80 queries: 8 cells of about a second
each). Each Ray run starts its own local instance of N CPUs (``num_cpus=N``: N workers, one CPU and
one torch thread a cell); the local executor runs the cells one after another with torch's default
threads. ``--repeats`` runs the three in turn that many times (interleaved, so drift hits all
alike) and reports the median.

    .venv/bin/python benchmarks/ray_range.py [--repeats 1] [--budgets 40 80]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from experiments.executors import Executor, LocalExecutor, RayExecutor
from experiments.results import read_results
from experiments.runner import run_scenario
from experiments.scenario import load_scenario


def tiny_scenario(store: Path, budgets: list[int]) -> dict[str, Any]:
    """The range tests' tiny scenario (tests/experiments/test_range.py), without defense costs."""
    return {
        "name": "tiny",
        "model_store": str(store),
        "victims": [{"model": "enc", "profile": None}],
        "defenses": [
            {"name": "none"},
            {"name": "noise", "pipeline": [{"name": "embedding_noise", "sigma": 0.5}]},
        ],
        "attacks": [
            {"attack": "stolen_encoder", "params": {"epochs": 1, "batch_size": 16, "max_steps": 2}},
            {
                "attack": "rda",
                "params": {"epochs": 1, "batch_size": 8, "max_steps": 2, "n_views": 4, "train_views": 2},
            },
        ],
        "budgets": budgets,
        "query_set": "synthetic",
        "query_split": "train",
        "evaluation": {
            "encoder": {
                "downstream": ["synthetic"],
                "probe_train_size": 100,
                "test_size": 50,
                "fidelity_size": 20,
                "probe_epochs": 2,
                "mlp_probe": False,
            }
        },
        "defense_cost": None,
        "device": "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budgets", type=int, nargs="+", default=[40, 80])
    args = parser.parse_args()
    os.environ.setdefault("STEALRANGE_NO_PROGRESS", "1")
    root = Path(tempfile.mkdtemp(prefix="ray_range_"))
    torch.manual_seed(0)
    encoder = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
    spec = InputSpec(channels=1, height=28, width=28)
    save_checkpoint(
        encoder, card_for(encoder, "enc", "small_cnn", input=spec, dataset="synthetic"), root / "enc"
    )
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_scenario(root, args.budgets)))
    scenario = load_scenario(path)
    setups: dict[str, Any] = {
        "ray, 1 worker": lambda: RayExecutor(address="local", num_cpus=1, cpus_per_cell=1),
        "ray, 2 workers": lambda: RayExecutor(address="local", num_cpus=2, cpus_per_cell=1),
        f"local ({torch.get_num_threads()} threads)": LocalExecutor,
    }
    times: dict[str, list[float]] = {name: [] for name in setups}
    cells: dict[str, list[float]] = {name: [] for name in setups}
    for repeat in range(args.repeats):
        for i, (name, make) in enumerate(setups.items()):
            executor: Executor = make()
            runs = root / f"runs-{repeat}-{i}"
            started = time.perf_counter()
            run_dir = run_scenario(scenario, runs=runs, progress=False, executor=executor)
            times[name].append(time.perf_counter() - started)
            lines = read_results(run_dir)
            assert len(lines) == len(scenario.cells()) and all(line.ok for line in lines), name
            cells[name].append(sum(line.wall_seconds for line in lines))
    print(f"\n{len(scenario.cells())} cells, {args.repeats} repeat(s), {os.cpu_count()} cores")
    print(f"{'executor':<22} {'wall s':>8} {'sum of cell s':>14}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in setups:
        print(f"{name:<22} {median[name]:>8.1f} {statistics.median(cells[name]):>14.1f}")
    one, two = median["ray, 1 worker"], median["ray, 2 workers"]
    local = next(v for k, v in median.items() if k.startswith("local"))
    print(f"\nwall time 1 worker / 2 workers: {one / two:.2f}x")
    print(f"wall time local / ray 2 workers: {local / two:.2f}x")


if __name__ == "__main__":
    main()

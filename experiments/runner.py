"""The range runner: one scenario, one victim API process, every cell through the SDK over HTTP.

``run_scenario`` (``stealrange run SCENARIO.yaml``):

1. trains (or reuses) each victim in the model store;
2. builds the run's own store ``runs/<name>/store``: each victim copied once per defense, under
   ``<victim>--<defense>``, with that defense's ``defenses.json``;
3. measures each defense's cost to honest users once (``costs.json``, reused on a rerun);
4. starts the victim API as its own process group on a free loopback port (embedded Redis, or
   ``redis_url``) and stops it on every exit path, Ctrl-C included;
5. per cell: creates an API key with the cell's budget and rate (admin API), runs the attack
   through its family (:meth:`attacker_client.families.AttackFamily.run`: the attacker client
   queries over HTTP, trains, evaluates, returns the family's typed result), reads the key's audit
   stream, and appends one typed line to ``results.jsonl`` (:class:`experiments.results.CellLine`);
   a failing cell is recorded with its error and the run goes on. The attacks run where the run's
   executor puts them (:mod:`experiments.executors`: here one after another, or as Ray tasks);
   keys, audit and ``results.jsonl`` stay with this process, which writes the lines in cell order;
6. writes the report (:mod:`experiments.report`).

A rerun resumes: cells already in ``results.jsonl`` with status ``ok`` are skipped; the others run
again and find what they already paid for in their query cache (``cells/<id>/query_cache.sqlite``,
keyed by scenario and served model, not by the port), so those queries cost nothing.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console

from attacker_client.runs import StealingRunConfig
from common.checkpoints import CARD_FILE, read_card
from common.training import TrainConfig
from defenses.config import DefenseConfig, load_defense_config, write_defense_config
from defenses.cost import defense_cost
from defenses.data import ProtectionRecipe, evaluate_protection, protect_dataset
from defenses.data.sep import SEPConfig
from experiments.executors import CellJob, CellOutcome, Executor, LocalExecutor
from experiments.report import build_report
from experiments.results import RESULTS_FILE, AuditSummary, CellLine, KeyUsage, append_result, read_results
from experiments.scenario import Cell, Scenario
from experiments.victim_process import victim_process
from victims.recipes import train_victim

COSTS_FILE = "costs.json"
REFERENCES_DIR = "references"
VICTIM_FILE = "victim.json"
AUDIT_POINTS = 100

console = Console(stderr=True)


def ensure_victims(scenario: Scenario, data_root: Path | None = None) -> dict[str, Path]:
    """Each victim's checkpoint folder, trained from its recipe first when the store lacks it."""
    folders: dict[str, Path] = {}
    for victim in scenario.victims:
        folder = scenario.model_store / victim.model
        recipe = victim.recipe()
        if recipe is not None and recipe.name == victim.model:
            train_victim(recipe, scenario.model_store, data_root=data_root)
        if not (folder / CARD_FILE).is_file():
            raise FileNotFoundError(
                f"victim {victim.model!r} is not in {scenario.model_store} "
                f"and no {victim.profile} recipe makes it"
            )
        folders[victim.model] = folder
    return folders


def build_range_store(scenario: Scenario, victims: dict[str, Path], store: Path) -> None:
    """The run's model store: every victim once per defense, renamed, with its ``defenses.json``."""
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    for cell in {c.served_name: c for c in scenario.cells()}.values():
        target = store / cell.served_name
        shutil.copytree(victims[cell.victim.model], target)
        card = read_card(target).model_copy(update={"name": cell.served_name})
        (target / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
        # A victim's own served pipeline (a Stingy teacher's top-k) comes before the cell's defense.
        own = load_defense_config(target).default
        config = DefenseConfig(default=[*own, *cell.defense.pipeline], detector=cell.defense.detector)
        write_defense_config(target, config)


def measure_costs(scenario: Scenario, store: Path, path: Path, data_root: Path | None) -> dict[str, Any]:
    """Cost to honest users of every (victim, defense), measured once and kept in ``costs.json``."""
    costs: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if scenario.defense_cost is None:
        return costs
    spec = scenario.defense_cost
    for cell in {c.served_name: c for c in scenario.cells()}.values():
        if cell.served_name in costs:
            continue
        console.print(f"[dim]cost to honest users of {cell.served_name}[/dim]")
        costs[cell.served_name] = defense_cost(
            store / cell.served_name,
            load_defense_config(store / cell.served_name).default,  # the victim's own and the cell's
            n=spec.images,
            probe_train_size=spec.probe_train_size,
            data_root=data_root,
            dataset=spec.dataset,
        )
        path.write_text(json.dumps(costs, indent=2) + "\n")
    return costs


def audit_summary(events: list[dict[str, str]]) -> AuditSummary:
    """Charges and refunds of a key over time: totals and a cumulative series (at most 100 points)."""
    charges = [e for e in events if e.get("event") in ("charge", "refund")]
    if not charges:
        return AuditSummary(events=0, images=0, seconds=0.0, series=[])
    t0 = int(charges[0]["t_us"])
    series, total = [], 0
    for event in charges:
        total += int(event["n"]) * (1 if event["event"] == "charge" else -1)
        series.append([(int(event["t_us"]) - t0) / 1e6, total])
    step = max(1, len(series) // AUDIT_POINTS)
    points = series[::step] if series[-1] in series[::step] else [*series[::step], series[-1]]
    return AuditSummary(events=len(charges), images=total, seconds=series[-1][0], series=points)


def stealing_config(
    cell: Cell,
    scenario: Scenario,
    url: str,
    api_key: str,
    out: Path,
    victim: Path,
    data_root: Path | None,
    progress: bool | None,
) -> StealingRunConfig:
    """The attacker's side of the cell: what its family's run needs (the victim's URL, the cell's
    API key, its run folder, the run's shared reference scores)."""
    return StealingRunConfig(
        url=url,
        key=api_key,
        model=cell.served_name,
        attack=cell.attack.attack,
        params={**cell.attack.params, "seed": cell.seed},
        query_set=scenario.query_set,
        query_split=scenario.query_split,
        budget=cell.budget,
        out=out,
        device=scenario.device,
        victim_checkpoint=victim,
        data_root=data_root,
        progress=progress,
        cache_namespace=f"{scenario.name}/{cell.served_name}",
        # <run>/cells/<id> -> <run>/references: reference scores measured once per run
        reference_cache=out.parent.parent / REFERENCES_DIR,
    )


def open_cell(
    cell: Cell,
    scenario: Scenario,
    url: str,
    admin: httpx.Client,
    run_dir: Path,
    victims: dict[str, Path],
    data_root: Path | None,
    progress: bool | None,
) -> CellJob:
    """The driver's side before a cell: its API key (budget, rate) from the admin API, its job."""
    key_spec: dict[str, Any] = {"name": cell.id[:64], "budget": cell.budget, "models": [cell.served_name]}
    if scenario.rate is not None:
        key_spec["rate"] = scenario.rate
    if scenario.burst is not None:
        key_spec["burst"] = scenario.burst
    created = admin.post("/admin/keys", json=key_spec)
    created.raise_for_status()
    key_id, api_key = created.json()["record"]["key_id"], created.json()["api_key"]
    out = run_dir / "cells" / cell.id
    config = stealing_config(
        cell, scenario, url, api_key, out, victims[cell.victim.model], data_root, progress
    )
    return CellJob(
        cell=cell, config=config, evaluation=scenario.evaluation_for(cell.attack.family), key_id=key_id
    )


def close_cell(job: CellJob, outcome: CellOutcome, scenario: Scenario, admin: httpx.Client) -> CellLine:
    """The driver's side after a cell: the key's usage, flags and audit, and the cell's line."""
    cell, key_id = job.cell, job.key_id
    started = time.perf_counter()
    usage = admin.get(f"/admin/keys/{key_id}").json()
    flags = admin.get(f"/admin/keys/{key_id}/defenses").json().get("flags", {})
    audit = audit_summary(admin.get(f"/admin/keys/{key_id}/audit", params={"count": 100_000}).json())
    return CellLine(
        cell=cell.id,
        scenario=scenario.name,
        victim=cell.victim.model,
        defense=cell.defense.name,
        pipeline=cell.defense.pipeline,
        detector=cell.defense.detector,
        attack=cell.attack.label,
        family=cell.attack.family.name,
        budget=cell.budget,
        seed=cell.seed,
        status=outcome.status,
        result=outcome.result,
        error=outcome.error,
        error_code=outcome.error_code,
        key=KeyUsage(id=key_id, used=usage.get("used"), budget=usage.get("budget")),
        flags=flags,
        audit=audit,
        wall_seconds=outcome.seconds + time.perf_counter() - started,
    )


PROTECTION_DIR = "protection"


def run_protection(scenario: Scenario, run_dir: Path, data_root: Path | None, progress: bool | None) -> None:
    """Self-Ensemble Protection cells: each (method, eps) protected, then evaluated (clean test
    accuracy after training on it, on the clean data, on noise); ``protection/<cell>/evaluation.json``
    marks a finished cell, so a rerun skips it."""
    spec = scenario.data_protection
    if spec is None:
        return
    for eps in spec.eps:
        for method in spec.methods:
            folder = run_dir / PROTECTION_DIR / f"{method}-eps{eps:g}"
            done = folder / "evaluation.json"
            if done.is_file():
                continue
            console.rule(f"data protection: {method} at eps {eps:g}/255 on {spec.size} {spec.dataset} images")
            recipe = ProtectionRecipe(
                dataset=spec.dataset,
                size=spec.size,
                n_checkpoints=spec.checkpoints,
                train=TrainConfig(epochs=spec.epochs, batch_size=128, lr=0.05, device=scenario.device),
                sep=SEPConfig(eps=eps / 255, step_size=(spec.step_size or eps / 4) / 255, steps=spec.steps),
                data_root=data_root,
            )
            started = time.perf_counter()
            meta = protect_dataset(recipe, folder, method, progress)
            result = evaluate_protection(folder)
            result |= {"protect_seconds": meta["seconds"], "wall_seconds": time.perf_counter() - started}
            done.write_text(json.dumps(result, indent=2) + "\n")
            console.print(
                f"  trained on protected {result['protected']:.4f}, clean {result['clean']:.4f}, "
                f"noise {result['random_noise']:.4f}"
            )


def run_scenario(
    scenario: Scenario,
    runs: Path = Path("runs"),
    redis_url: str | None = None,
    resume: bool = True,
    data_root: Path | None = None,
    progress: bool | None = None,
    on_cell: Callable[[int, int, Cell], None] | None = None,
    executor: Executor | None = None,
    victim_host: str = "127.0.0.1",
) -> Path:
    """Run every cell of ``scenario`` not yet finished; returns the run folder (see module docstring).

    ``executor``: where the cells' attacks run (default :class:`~experiments.executors.LocalExecutor`,
    one after another here; :class:`~experiments.executors.RayExecutor` on a Ray cluster).
    ``victim_host``: the address the victim API binds, which the attacks reach it at (a wildcard
    such as ``0.0.0.0``: this machine's address on its default route)."""
    executor = executor or LocalExecutor()
    if scenario.workers > 1 and not redis_url:
        raise ValueError(
            "workers > 1 needs a real Redis (redis_url / STEALRANGE_REDIS_URL): "
            "the embedded one is per process"
        )
    run_dir = runs / scenario.name
    run_dir.mkdir(parents=True, exist_ok=True)
    results = run_dir / RESULTS_FILE
    if not resume:
        results.unlink(missing_ok=True)
        (run_dir / COSTS_FILE).unlink(missing_ok=True)
        shutil.rmtree(run_dir / PROTECTION_DIR, ignore_errors=True)
        shutil.rmtree(run_dir / REFERENCES_DIR, ignore_errors=True)
    (run_dir / "scenario.yaml").write_text(yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False))
    finished = {line.cell for line in read_results(run_dir) if line.ok}
    cells = scenario.cells()
    todo = [cell for cell in cells if cell.id not in finished]
    console.print(
        f"[bold]{scenario.name}[/bold]: {len(cells)} cells, "
        f"{len(cells) - len(todo)} finished, {len(todo)} to run"
    )
    if todo:
        victims = ensure_victims(scenario, data_root)
        store = run_dir / "store"
        build_range_store(scenario, victims, store)
        measure_costs(scenario, store, run_dir / COSTS_FILE, data_root)
        admin_token = secrets.token_urlsafe(32)
        env = {
            "STEALRANGE_ADMIN_TOKEN": admin_token,
            # Random per run: a secret derived from the scenario would let anyone who reads the
            # scenario recompute the keyed noise and invert B4B's transforms.
            "STEALRANGE_SERVER_SECRET": secrets.token_urlsafe(32),
            "STEALRANGE_KEY_PEPPER": secrets.token_urlsafe(32),
            "STEALRANGE_REDIS_PREFIX": f"range-{scenario.name}-{secrets.token_hex(4)}",
        }
        run_started = time.perf_counter()
        with (
            victim_process(
                store,
                redis_url,
                workers=scenario.workers,
                env=env,
                pid_file=run_dir / VICTIM_FILE,
                host=victim_host,
            ) as url,
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60
            ) as admin,
        ):
            position = {cell.id: i for i, cell in enumerate(todo, 1)}

            def start(cell: Cell) -> CellJob:
                i = position[cell.id]
                console.rule(
                    f"[{i}/{len(todo)}] {cell.victim.model} x {cell.defense.name} "
                    f"x {cell.attack.label} x {cell.budget}"
                )
                if on_cell is not None:
                    on_cell(i, len(todo), cell)
                return open_cell(cell, scenario, url, admin, run_dir, victims, data_root, progress)

            def finish(job: CellJob, outcome: CellOutcome) -> None:
                line = close_cell(job, outcome, scenario, admin)
                append_result(run_dir, line)
                status = "ok" if line.ok else f"[red]{line.status}: {line.error}[/red]"
                console.print(
                    f"  [{position[line.cell]}/{len(todo)}] {line.cell}: {status} ({line.wall_seconds:.0f} s)"
                )

            executor.run(todo, start, finish)
        console.print(
            f"ran {len(todo)} cells ({executor.name} executor) in {time.perf_counter() - run_started:.0f} s"
        )
    run_protection(scenario, run_dir, data_root, progress)
    build_report(run_dir)
    return run_dir

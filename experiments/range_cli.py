"""``stealrange run SCENARIO`` and ``stealrange report RUN_DIR``: the range's two commands."""

from __future__ import annotations

import signal
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from experiments.executors import make_executor
from experiments.report import build_report
from experiments.results import ResultsFormatError
from experiments.runner import console, run_scenario
from experiments.scenario import ScenarioError, load_scenario


class ExecutorName(StrEnum):
    """``--executor``: :class:`~experiments.executors.LocalExecutor` or
    :class:`~experiments.executors.RayExecutor`."""

    local = "local"
    ray = "ray"


def interrupt_on_signals() -> None:
    """SIGINT (even when a shell started us with it ignored, as for background jobs) and SIGTERM
    raise KeyboardInterrupt, so the runner's clean-up (stopping the victim API) always runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def run_command(
    scenario: Annotated[
        Path, typer.Argument(help="a scenario YAML file, e.g. experiments/scenarios/quick.yaml")
    ],
    runs: Annotated[Path, typer.Option(help="results go to RUNS/<scenario name>/")] = Path("runs"),
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar="STEALRANGE_REDIS_URL", help="a real Redis for the victim API (default: embedded)"
        ),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="forget finished cells and run them all again")
    ] = False,
    data_root: Annotated[Path | None, typer.Option(envvar="STEALRANGE_DATA_ROOT")] = None,
    executor: Annotated[
        ExecutorName, typer.Option(help="where the cells run: one after another here, or as Ray tasks")
    ] = ExecutorName.local,
    address: Annotated[
        str | None,
        typer.Option(
            help="--executor ray: the cluster's address (default: $RAY_ADDRESS, else the cluster "
            "started on this machine, else a new local instance)",
        ),
    ] = None,
    cpus_per_cell: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch threads of each cell, and with --executor ray its task's CPUs (default: "
            "torch's locally, 1 on Ray); the same value gives the same numbers with both executors",
        ),
    ] = None,
    gpus_per_cell: Annotated[
        float | None,
        typer.Option(
            min=0, help="--executor ray: GPUs of each cell's task (default: 1 if the cluster has any)"
        ),
    ] = None,
    ray_cpus: Annotated[
        int | None, typer.Option(min=1, help="--executor ray: CPUs of a new local Ray instance")
    ] = None,
    victim_host: Annotated[
        str,
        typer.Option(
            help="address the victim API binds and the cells reach it at (on a cluster: this "
            "machine's address the workers reach, or 0.0.0.0)"
        ),
    ] = "127.0.0.1",
) -> None:
    """Run a scenario: victims x defenses x attacks x budgets, over HTTP; write results and report."""
    interrupt_on_signals()
    try:
        spec = load_scenario(scenario)
    except ScenarioError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    try:
        runner = make_executor(
            executor.value,
            address=address,
            cpus_per_cell=cpus_per_cell,
            gpus_per_cell=gpus_per_cell,
            num_cpus=ray_cpus,
        )
        run_dir = run_scenario(
            spec,
            runs=runs,
            redis_url=redis_url,
            resume=not fresh,
            data_root=data_root,
            executor=runner,
            victim_host=victim_host,
        )
    except (FileNotFoundError, ValueError) as exc:  # a missing victim, an old results.jsonl, ...
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the victim API is stopped; rerun the command to resume[/yellow]")
        raise typer.Exit(130) from None
    console.print(f"report: {run_dir / 'report.md'}")


def report_command(run_dir: Annotated[Path, typer.Argument(help="a run folder, e.g. runs/quick")]) -> None:
    """Rebuild a run's report.md and plots from its results.jsonl."""
    try:
        path = build_report(run_dir)
    except (FileNotFoundError, ResultsFormatError) as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(f"report: {path}")

"""``stealrange claims``: the papers' claims checked by one command (:mod:`experiments.claims`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from common.devices import resolve_device
from experiments.claims.base import CLAIMS, DEFAULT_STORE, SIZES
from experiments.claims.runner import (
    DEFAULT_CACHE,
    DEFAULT_OUT,
    DEFAULT_SEEDS,
    console,
    natural_key,
    run_claims,
)


def default_jobs(size: str, device: str) -> int:
    """Two jobs for the full size on a CPU of 2 cores or more (a small network gains little from a
    second torch thread; two single-thread jobs use both cores), one otherwise."""
    cpu = str(resolve_device(device)) == "cpu"
    return 2 if size == "full" and cpu and (os.cpu_count() or 1) >= 2 else 1


def claims_command(
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="a claim to run (repeat for several; default all: "
            f"{', '.join(sorted(CLAIMS, key=natural_key))})",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds 0..N-1 per claim")] = DEFAULT_SEEDS,
    size: Annotated[
        str, typer.Option(help="full: the fair small-scale try (<= 60 min on 2 cores); ci: seconds")
    ] = "full",
    out: Annotated[
        Path, typer.Option(help="the markdown report; its .json twin goes beside it")
    ] = DEFAULT_OUT,
    cache: Annotated[Path, typer.Option(help="per-seed measurements, reused by a rerun")] = DEFAULT_CACHE,
    store: Annotated[Path, typer.Option(help="model store of the victims (full size)")] = DEFAULT_STORE,
    device: Annotated[str, typer.Option(help="cpu, cuda, auto")] = "cpu",
    fresh: Annotated[bool, typer.Option("--fresh", help="measure again, ignoring the cache")] = False,
    jobs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="processes measuring the claims' groups side by side (default: 2 for the full size "
            "on a CPU with 2+ cores, else 1)",
        ),
    ] = None,
) -> None:
    """Measure each paper's headline claim over seeds; write verdicts computed from the intervals."""
    if size not in SIZES:
        raise typer.BadParameter(f"expected one of {', '.join(SIZES)}", param_hint="--size")
    try:
        for name in only or []:
            CLAIMS.get(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--only") from None
    report = run_claims(
        only=only,
        seeds=seeds,
        size=size,  # checked against SIZES above
        out=out,
        cache=cache,
        store=store,
        device=str(resolve_device(device)),
        fresh=fresh,
        jobs=jobs if jobs is not None else default_jobs(size, device),
    )
    for row in report.rows:
        console.print(f"{row.name}: {row.verdict}")
    console.print(f"report: {out} and {out.with_suffix('.json')}")
    if report.errors:
        console.print(f"[red]failed measurements: {report.errors}[/red]")
        raise typer.Exit(1)

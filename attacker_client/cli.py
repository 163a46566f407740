"""``stealrange attack ...``: steal a victim model over its API with one of the registered attacks.

    stealrange attack list                      # every attack, its family and paper; the UQ methods
    stealrange attack params rda                # every parameter with its default (rrm, swag, ...)
    stealrange attack rda --url URL --key KEY --model fmnist-encoder \\
        --query-set mnist5k --budget 20000 --out runs/rda1 -p epochs=20
    stealrange attack ensemble --method swag --url URL --key KEY --model fmnist-classifier ...
    stealrange attack rrm --url URL --key KEY --model fmnist-robust-encoder ...
    torchrun --nproc_per_node 4 --no-python stealrange attack rda ...   # DDP on 4 GPUs, budget spent once

One command per registered attack (:data:`attacker_client.attacks.ATTACKS`), built by its family's
``command`` (:mod:`attacker_client.families`, :mod:`attacker_client.commands`). Each attack's
parameters are set with ``-p name=value`` (values parsed as JSON when they parse, else taken as
text) and validated before any query is spent.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from attacker_client.attacks import ATTACKS
from attacker_client.families import FAMILIES
from attacker_client.uq import UQ_METHODS

attack_app = typer.Typer(help="Steal a victim model through its API.", no_args_is_help=True)
_console = Console()


@attack_app.command("list")
def list_command() -> None:
    """List the attacks, their families and papers (and the UQ methods of ensemble stealing)."""
    table = Table("attack", "family", "steals", "paper", "queries per sample")
    for name, cls in ATTACKS.items():
        family = FAMILIES.get(cls.family)
        table.add_row(
            name.replace("_", "-"), family.name, family.kind, cls.paper, str(cls().queries_per_sample())
        )
    _console.print(table)
    methods = Table("UQ method (ensemble --method)", "paper")
    for name, method in UQ_METHODS.items():
        methods.add_row(name, method.paper)
    _console.print(methods)


@attack_app.command("params")
def params_command(attack: Annotated[str, typer.Argument(help="an attack or UQ method name")]) -> None:
    """Show an attack's (or a UQ method's) parameters, defaults and meaning."""
    classes: list[Any] = [registry.get(attack) for registry in (ATTACKS, UQ_METHODS) if attack in registry]
    if not classes:
        known = [*ATTACKS.names(), *UQ_METHODS.names()]
        raise typer.BadParameter(f"unknown attack or UQ method {attack!r}; known: {', '.join(known)}")
    for cls in classes:
        table = Table("parameter", "default", "meaning", title=f"{cls.name}: {cls.paper}")
        for name, field in cls.Params.model_fields.items():
            default = field.get_default(call_default_factory=True)
            table.add_row(name, json.dumps(default), field.description or "")
        _console.print(table)


for _name, _cls in ATTACKS.items():
    _family = FAMILIES.get(_cls.family)
    if _family.command is not None:
        attack_app.command(_name.replace("_", "-"))(_family.command(_family, _cls))

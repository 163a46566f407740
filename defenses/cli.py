"""``stealrange defenses ...``: list the defenses, and measure what one costs honest users.

    stealrange defenses list
    stealrange defenses cost --model model_store/fmnist-classifier \\
        --defense "reverse_sigmoid(beta=0.7, gamma=0.2)" --defense "top_k(k=3)"
    stealrange defenses train-misinformation --model model_store/fmnist-classifier
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import defenses.output  # noqa: F401  (registers the output defenses)
from defenses.base import DEFENSES
from defenses.cost import defense_cost, parse_defense
from defenses.output.adaptive_misinformation import MISINFORMATION_FOLDER, train_misinformation_model

defenses_app = typer.Typer(help="Output defenses: list them, measure their cost.", no_args_is_help=True)
_console = Console()


@defenses_app.command("list")
def list_command() -> None:
    """Every defense with its model kinds, parameters (defaults) and paper."""
    table = Table("defense", "for", "parameters (defaults)", "paper")
    for name, cls in DEFENSES.items():
        params = ", ".join(
            f"{field}={json.dumps(info.get_default(call_default_factory=True))}"
            for field, info in cls.Params.model_fields.items()
        )
        table.add_row(name, ", ".join(sorted(cls.kinds)), params or "-", cls.paper)
    _console.print(table)


@defenses_app.command("cost")
def cost_command(
    model: Annotated[Path, typer.Option(help="a model's checkpoint folder in the model store")],
    defense: Annotated[
        list[str], typer.Option("--defense", "-d", help="name or name(param=value, ...), in order (repeat)")
    ],
    images: Annotated[int, typer.Option(min=10, help="held-out test images")] = 2000,
    probe_train_size: Annotated[
        int, typer.Option(min=10, help="encoders: benign probe's training images")
    ] = 5000,
    data_root: Annotated[Path | None, typer.Option(envvar="STEALRANGE_DATA_ROOT")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="the honest user's task (default: the model's dataset)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """What the defense pipeline costs honest users of MODEL on held-out data."""
    try:
        specs = [parse_defense(text) for text in defense]
        result = defense_cost(
            model, specs, n=images, probe_train_size=probe_train_size, data_root=data_root, dataset=dataset
        )
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table("measure", "value", title=f"{result['model']}: {result['defense']}")
    for name, value in result.items():
        if isinstance(value, float):
            table.add_row(name, f"{value:.4f}")
    _console.print(table)


@defenses_app.command("train-misinformation")
def train_misinformation_command(
    model: Annotated[Path, typer.Option(help="a classifier's checkpoint folder in the model store")],
    epochs: Annotated[int, typer.Option(min=1)] = 5,
    train_size: Annotated[int | None, typer.Option(min=10, help="first N victim training images")] = None,
    seed: int = 0,
    data_root: Annotated[Path | None, typer.Option(envvar="STEALRANGE_DATA_ROOT")] = None,
) -> None:
    """Train the misinformation model Adaptive Misinformation needs (saved in MODEL/misinformation)."""
    try:
        metrics = train_misinformation_model(
            model, epochs=epochs, train_size=train_size, seed=seed, data_root=data_root
        )
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from None
    _console.print(
        f"misinformation model in {model / MISINFORMATION_FOLDER}: it names the right class for "
        f"{metrics['test_accuracy']:.1%} of the test images"
    )

"""``stealrange train-victim``: train a victim from its recipe (or reuse it) into the model store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.params import parse_params
from victims.recipes import recipe_for, robust_recipe, train_victim

console = Console()


def train_victim_command(
    kind: Annotated[str, typer.Option(help="classifier or encoder")] = "classifier",
    profile: Annotated[
        str, typer.Option(help="quick (Fashion-MNIST, CPU) or paper (CIFAR-10, ResNet-18)")
    ] = "quick",
    store: Annotated[Path, typer.Option(envvar="STEALRANGE_MODEL_STORE")] = Path("model_store"),
    data_root: Annotated[Path | None, typer.Option(envvar="STEALRANGE_DATA_ROOT")] = None,
    name: Annotated[str | None, typer.Option(help="checkpoint name (default: the recipe's)")] = None,
    epochs: Annotated[int | None, typer.Option(help="override the recipe's epochs")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:i")] = "auto",
    seed: int = 0,
    force: Annotated[bool, typer.Option(help="retrain even if the store has this recipe")] = False,
    defense: Annotated[
        str | None, typer.Option(help="training-time defense of a classifier: ast, nasty or stingy")
    ] = None,
    defense_param: Annotated[
        list[str] | None, typer.Option("--defense-param", "-d", help="defense parameter name=value (repeat)")
    ] = None,
    robust: Annotated[
        bool, typer.Option(help="an adversarially trained (PGD-AT) classifier served as an encoder")
    ] = False,
) -> None:
    """Train a victim (or reuse it) and save it in the model store.

    With ``--defense`` (classifiers), the plain victim is trained or reused first as the baseline,
    then the defended teacher ``<victim>-<defense>`` is trained from it (Adversarial Sparse Teacher,
    Nasty Teacher) or served sparse (Stingy Teacher: the baseline with a ``top_k`` defenses.json).
    With ``--robust``, a PGD adversarially trained classifier whose representation is served as an
    encoder (the teacher of Robust Representation Matching).
    """
    if kind not in ("classifier", "encoder") or profile not in ("quick", "paper"):
        console.print("[red]--kind is classifier|encoder and --profile quick|paper[/red]")
        raise typer.Exit(2)
    try:
        if robust:
            recipe = robust_recipe(profile)  # type: ignore[arg-type]
        else:
            recipe = recipe_for(kind, profile, defense, **parse_params(defense_param or []))  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    train = recipe.train.model_copy(
        update={"device": device, "seed": seed, **({"epochs": epochs} if epochs else {})}
    )
    recipe = recipe.model_copy(update={"train": train, **({"name": name} if name else {})})
    card = train_victim(recipe, store, data_root=data_root, force=force)
    console.print(
        f"[green]{card.name}[/green] in {store / card.name}: {json.dumps(card.metrics)} "
        f"({card.training.get('seconds')} s)"
    )

"""``stealrange protect-data`` and ``stealrange evaluate-protection`` (Self-Ensemble Protection).

    stealrange protect-data --method sep-fa-vr --eps 8 --size 10000 --out data/fmnist-sep
    stealrange evaluate-protection data/fmnist-sep

``--eps`` and ``--step-size`` are in pixel levels (x/255), as the paper writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.training import TrainConfig
from defenses.data.protection import ProtectionRecipe, evaluate_protection, protect_dataset
from defenses.data.sep import SEPConfig

_console = Console()


def protect_data_command(
    out: Annotated[Path, typer.Option(help="folder of the protected copy")],
    method: Annotated[str, typer.Option(help="sep, sep-fa, sep-fa-vr, or noise (the baseline)")] = "sep",
    eps: Annotated[float, typer.Option(help="L-inf radius in pixel levels (8 = 8/255)")] = 8.0,
    step_size: Annotated[float, typer.Option(help="step in pixel levels")] = 2.0,
    steps: Annotated[int, typer.Option(min=1, help="updates per image")] = 10,
    checkpoints: Annotated[int, typer.Option(min=1, help="snapshots of the protecting run")] = 10,
    dataset: Annotated[str, typer.Option(help="dataset whose train split is protected")] = "fashion_mnist",
    size: Annotated[int | None, typer.Option(min=10, help="first images of the train split")] = 10_000,
    epochs: Annotated[int, typer.Option(min=1, help="epochs of the protecting run")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:i")] = "auto",
    data_root: Annotated[Path | None, typer.Option(envvar="STEALRANGE_DATA_ROOT")] = None,
) -> None:
    """Write a protected copy of a dataset (Self-Ensemble Protection, Chen et al., ICLR 2023)."""
    if method not in ("sep", "sep-fa", "sep-fa-vr", "noise"):
        raise typer.BadParameter("one of sep, sep-fa, sep-fa-vr, noise", param_hint="--method")
    try:
        recipe = ProtectionRecipe(
            dataset=dataset,
            size=size,
            n_checkpoints=checkpoints,
            train=TrainConfig(epochs=epochs, batch_size=128, lr=0.05, device=device),
            sep=SEPConfig(eps=eps / 255, step_size=step_size / 255, steps=steps),
            data_root=data_root,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    meta = protect_dataset(recipe, out, method)
    _console.print(
        f"{meta['method']}: {meta['images']} images of {dataset}, largest change "
        f"{meta['max_perturbation'] * 255:.1f}/255, {meta['seconds']:.0f} s -> {out}"
    )


def evaluate_protection_command(
    folder: Annotated[Path, typer.Argument(help="a folder written by protect-data")],
    epochs: Annotated[int | None, typer.Option(min=1, help="override the training epochs")] = None,
    test_size: Annotated[int | None, typer.Option(min=10, help="cap on clean test images")] = None,
) -> None:
    """Train fresh models on the protected copy, the clean data and random noise of the same eps;
    print their clean test accuracy."""
    from defenses.data.protection import load_protected

    _, meta = load_protected(folder)
    train = ProtectionRecipe.model_validate(meta["recipe"]).train
    if epochs is not None:
        train = train.model_copy(update={"epochs": epochs})
    result = evaluate_protection(folder, train, test_size)
    table = Table(
        "trained on", "clean test accuracy", title=f"{result['method']} at eps {result['eps'] * 255:.1f}/255"
    )
    table.add_row("clean data", f"{result['clean']:.4f}")
    table.add_row(f"random noise (±{result['eps'] * 255:.1f}/255)", f"{result['random_noise']:.4f}")
    table.add_row(f"{result['method']}-protected data", f"{result['protected']:.4f}")
    _console.print(table)
    (Path(folder) / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")

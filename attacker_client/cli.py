"""``stealrange attack ...``: steal a victim encoder over its API with one of the registered attacks.

    stealrange attack list                      # attacks and their papers
    stealrange attack params rda                # every parameter with its default
    stealrange attack rda --url URL --key KEY --model fmnist-encoder \\
        --query-set mnist5k --budget 20000 --out runs/rda1 -p epochs=20
    torchrun --nproc_per_node 4 --no-python stealrange attack rda ...   # DDP on 4 GPUs, budget spent once

Each attack's parameters are set with ``-p name=value`` (values parsed as JSON when they parse,
else taken as text) and validated before any query is spent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from attacker_client.attacks import attack_class, list_attacks
from attacker_client.evaluate import EvalConfig
from attacker_client.steal_encoder import RESULT_FILE, EncoderStealingConfig, steal_encoder
from common import distributed

attack_app = typer.Typer(help="Steal a victim model through its API.", no_args_is_help=True)
_console = Console()


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=20", "train_view=none"]`` -> ``{"epochs": 20, "train_view": "none"}``."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"expected name=value, got {pair!r}", param_hint="--param")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[name.strip().replace("-", "_")] = value
    return params


@attack_app.command("list")
def list_command() -> None:
    """List the attacks and their papers."""
    table = Table("attack", "paper", "queries per sample")
    for name in list_attacks():
        cls = attack_class(name)
        table.add_row(name.replace("_", "-"), cls.paper, str(cls().queries_per_sample()))
    _console.print(table)


@attack_app.command("params")
def params_command(attack: Annotated[str, typer.Argument(help="an attack name")]) -> None:
    """Show an attack's parameters, defaults and meaning."""
    try:
        cls = attack_class(attack)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    table = Table("parameter", "default", "meaning", title=f"{cls.name}: {cls.paper}")
    for name, field in cls.Params.model_fields.items():
        table.add_row(name, json.dumps(field.get_default(call_default_factory=True)), field.description or "")
    _console.print(table)


def _summary(record: dict[str, Any]) -> Table:
    evaluation = record["evaluation"]
    table = Table(
        "set", "metric", "surrogate", "victim", "untrained", "surrogate/victim", title=record["attack"]
    )
    for dataset, scores in evaluation["surrogate"].items():
        for metric, value in scores.items():
            victim = (evaluation.get("victim") or {}).get(dataset, {}).get(metric)
            untrained = (evaluation.get("untrained") or {}).get(dataset, {}).get(metric)
            table.add_row(
                dataset,
                metric,
                f"{value:.4f}",
                "-" if victim is None else f"{victim:.4f}",
                "-" if untrained is None else f"{untrained:.4f}",
                "-" if not victim else f"{value / victim:.3f}",
            )
    return table


def _make_attack_command(name: str) -> None:
    cls = attack_class(name)

    def command(
        url: Annotated[str, typer.Option(envvar="STEALRANGE_URL", help="victim API base URL")],
        key: Annotated[str, typer.Option(envvar="STEALRANGE_API_KEY", help="API key (sr-...)")],
        model: Annotated[str, typer.Option(help="victim encoder name")],
        budget: Annotated[int, typer.Option(min=1, help="most queries (images) to spend")],
        out: Annotated[Path, typer.Option(help="run folder: surrogate, result.json, query cache")],
        query_set: Annotated[str, typer.Option(help="attacker's query images (a dataset name)")] = "mnist5k",
        query_split: Annotated[
            str, typer.Option(help="train, test, or attacker (the pool the victim never trained on)")
        ] = "train",
        param: Annotated[
            list[str] | None, typer.Option("--param", "-p", help="attack parameter name=value (repeat)")
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:i")] = "auto",
        victim_checkpoint: Annotated[
            Path | None, typer.Option(help="victim's checkpoint, for white-box reference scores")
        ] = None,
        eval_sets: Annotated[
            str, typer.Option(help="downstream sets, comma-separated")
        ] = "fashion_mnist,mnist5k",
        probe_train_size: Annotated[int, typer.Option(min=10)] = 10_000,
        probe_epochs: Annotated[int, typer.Option(min=1)] = 100,
        mlp_probe: Annotated[bool, typer.Option(help="also train RDA's MLP probe")] = True,
        data_root: Annotated[Path | None, typer.Option(envvar="STEALRANGE_DATA_ROOT")] = None,
    ) -> None:
        try:
            config = EncoderStealingConfig(
                url=url,
                key=key,
                model=model,
                attack=name,
                params=parse_params(param or []),
                query_set=query_set,
                query_split=query_split,
                budget=budget,
                out=out,
                device=device,
                victim_checkpoint=victim_checkpoint,
                data_root=data_root,
                evaluation=EvalConfig(
                    downstream=[s.strip() for s in eval_sets.split(",") if s.strip()],
                    probe_train_size=probe_train_size,
                    probe_epochs=probe_epochs,
                    mlp_probe=mlp_probe,
                    data_root=data_root,
                ),
            )
            cls(config.params)  # validate the parameters before any query
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        try:
            record = steal_encoder(config)
        finally:
            distributed.shutdown()
        if "evaluation" not in record:  # a rank other than 0 under torchrun: rank 0 reports
            return
        _console.print(_summary(record))
        queries = record["queries"]
        fidelity = record["evaluation"].get("fidelity") or {}
        _console.print(
            f"queries spent (server): {queries['spent']} of budget {record['budget']} "
            f"({queries['cache_hits']} cache hits); cosine fidelity: "
            f"{fidelity.get('cosine', float('nan')):.4f}; "
            f"{record['seconds']['total']:.0f} s on {record['device']}"
        )
        _console.print(f"result: {out / RESULT_FILE}")

    command.__doc__ = f"{cls.paper}. {(cls.__doc__ or '').strip()}"
    attack_app.command(name.replace("_", "-"))(command)


for _name in list_attacks():
    _make_attack_command(_name)

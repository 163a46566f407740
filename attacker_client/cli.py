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

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from attacker_client.attacks import attack_class, list_attacks
from attacker_client.attacks.classifier import classifier_attack_class, list_classifier_attacks
from attacker_client.attacks.rrm import RRMParams
from attacker_client.evaluate import EvalConfig
from attacker_client.runs import RESULT_FILE
from attacker_client.steal_classifier import ClassifierStealingConfig, steal_classifier
from attacker_client.steal_encoder import EncoderStealingConfig, steal_encoder
from attacker_client.steal_robustness import RobustnessStealingConfig, steal_robustness
from attacker_client.uq import list_uq_methods, uq_method_class
from common import distributed
from common.params import parse_params

attack_app = typer.Typer(help="Steal a victim model through its API.", no_args_is_help=True)
_console = Console()


@attack_app.command("list")
def list_command() -> None:
    """List the attacks and their papers (and the UQ methods of ensemble stealing)."""
    table = Table("attack", "steals", "paper", "queries per sample")
    for name in list_attacks():
        cls = attack_class(name)
        table.add_row(name.replace("_", "-"), "encoder", cls.paper, str(cls().queries_per_sample()))
    for name in list_classifier_attacks():
        table.add_row(name, "classifier", classifier_attack_class(name).paper, "1")
    _console.print(table)
    methods = Table("UQ method (ensemble --method)", "paper")
    for name in list_uq_methods():
        methods.add_row(name, uq_method_class(name).paper)
    _console.print(methods)


@attack_app.command("params")
def params_command(attack: Annotated[str, typer.Argument(help="an attack or UQ method name")]) -> None:
    """Show an attack's (or a UQ method's) parameters, defaults and meaning."""
    classes: list[Any] = []
    for find in (attack_class, classifier_attack_class, uq_method_class):
        with contextlib.suppress(ValueError):
            classes.append(find(attack))
    if not classes:
        known = [*list_attacks(), *list_classifier_attacks(), *list_uq_methods()]
        raise typer.BadParameter(f"unknown attack or UQ method {attack!r}; known: {', '.join(known)}")
    for cls in classes:
        table = Table("parameter", "default", "meaning", title=f"{cls.name}: {cls.paper}")
        for name, field in cls.Params.model_fields.items():
            default = field.get_default(call_default_factory=True)
            table.add_row(name, json.dumps(default), field.description or "")
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


def _classifier_summary(record: dict[str, Any]) -> Table:
    evaluation = record["evaluation"]
    title = record["attack"] + (f" ({record['method']})" if record.get("method") else "")
    table = Table("surrogate", "accuracy", "agreement", "KL(victim||s)", "L1", title=title)

    def row(label: str, scores: dict[str, float]) -> None:
        cells = [scores.get(k) for k in ("accuracy", "agreement", "kl", "l1")]
        table.add_row(label, *("-" if v is None else f"{v:.4f}" for v in cells))

    if evaluation.get("victim"):
        row("victim", evaluation["victim"])
    row("single network", evaluation["single"])
    if len(evaluation["members"]) > 1:
        for i, scores in enumerate(evaluation["members"]):
            row(f"member {i}", scores)
        row("combined (mean)", evaluation["combined"])
    return table


def _run_classifier_attack(name: str, params: dict[str, Any], **options: Any) -> None:
    """Build the config (validated before any query), run, print the summary."""
    try:
        config = ClassifierStealingConfig(attack=name, params=params, **options)
        classifier_attack_class(name)(config.params)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    record = steal_classifier(config)
    _console.print(_classifier_summary(record))
    queries, diversity = record["queries"], record["evaluation"]["diversity"]
    _console.print(
        f"queries spent (server): {queries['spent']} of budget {record['budget']} "
        f"({queries['cache_hits']} cache hits), output {record['output']}; members' variance "
        f"{diversity['variance']:.5f}, disagreement {diversity['disagreement']:.4f}; "
        f"{record['seconds']['total']:.0f} s on {record['device']}"
    )
    _console.print(f"result: {Path(config.out) / RESULT_FILE}")


_URL = Annotated[str, typer.Option(envvar="STEALRANGE_URL", help="victim API base URL")]
_KEY = Annotated[str, typer.Option(envvar="STEALRANGE_API_KEY", help="API key (sr-...)")]
_MODEL = Annotated[str, typer.Option(help="victim classifier name")]
_BUDGET = Annotated[int, typer.Option(min=1, help="most queries (images) to spend")]
_OUT = Annotated[Path, typer.Option(help="run folder: surrogate(s), result.json, query cache")]
_QUERY_SET = Annotated[str, typer.Option(help="attacker's query images (a dataset name)")]
_QUERY_SPLIT = Annotated[str, typer.Option(help="train, test, or attacker (never seen by the victim)")]
_OUTPUT = Annotated[str, typer.Option(help="auto, probabilities, top_k or label")]
_PARAM = Annotated[list[str] | None, typer.Option("--param", "-p", help="attack parameter name=value")]
_DEVICE = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:i")]
_VICTIM = Annotated[Path | None, typer.Option(help="victim's checkpoint, for agreement / KL / L1")]
_TEST_SIZE = Annotated[int, typer.Option(min=10, help="held-out test images scored")]
_DATA_ROOT = Annotated[Path | None, typer.Option(envvar="STEALRANGE_DATA_ROOT")]


@attack_app.command("knockoff")
def knockoff_command(
    url: _URL,
    key: _KEY,
    model: _MODEL,
    budget: _BUDGET,
    out: _OUT,
    query_set: _QUERY_SET = "fashion_mnist",
    query_split: _QUERY_SPLIT = "attacker",
    output: _OUTPUT = "auto",
    param: _PARAM = None,
    device: _DEVICE = "auto",
    victim_checkpoint: _VICTIM = None,
    test_size: _TEST_SIZE = 2000,
    data_root: _DATA_ROOT = None,
) -> None:
    """Knockoff Nets (Orekondy et al., CVPR 2019): one surrogate distilled from the victim's
    probabilities, top-k or labels on a transfer set queried once."""
    _run_classifier_attack(
        "knockoff",
        {**parse_params(param or []), "output": output},
        url=url,
        key=key,
        model=model,
        budget=budget,
        out=out,
        query_set=query_set,
        query_split=query_split,
        device=device,
        victim_checkpoint=victim_checkpoint,
        test_size=test_size,
        data_root=data_root,
    )


@attack_app.command("ensemble")
def ensemble_command(
    url: _URL,
    key: _KEY,
    model: _MODEL,
    budget: _BUDGET,
    out: _OUT,
    method: Annotated[
        str, typer.Option(help="deep_ensemble, mc_dropout, swag, bbb or laplace")
    ] = "deep_ensemble",
    members: Annotated[int, typer.Option(min=2, help="members (networks or posterior samples)")] = 5,
    method_param: Annotated[
        list[str] | None, typer.Option("--method-param", "-m", help="UQ method parameter name=value")
    ] = None,
    query_set: _QUERY_SET = "fashion_mnist",
    query_split: _QUERY_SPLIT = "attacker",
    output: _OUTPUT = "auto",
    param: _PARAM = None,
    device: _DEVICE = "auto",
    victim_checkpoint: _VICTIM = None,
    test_size: _TEST_SIZE = 2000,
    data_root: _DATA_ROOT = None,
) -> None:
    """Ensemble stealing (Pape et al., ESANN 2023): a UQ method's members share one transfer set
    (queries paid once); their mean probability is the stolen model."""
    params = {
        **parse_params(param or []),
        "output": output,
        "method": method.replace("-", "_"),
        "members": members,
        "method_params": parse_params(method_param or []),
    }
    _run_classifier_attack(
        "ensemble",
        params,
        url=url,
        key=key,
        model=model,
        budget=budget,
        out=out,
        query_set=query_set,
        query_split=query_split,
        device=device,
        victim_checkpoint=victim_checkpoint,
        test_size=test_size,
        data_root=data_root,
    )


@attack_app.command("rrm")
def rrm_command(
    url: _URL,
    key: _KEY,
    model: Annotated[str, typer.Option(help="victim encoder (an adversarially trained representation)")],
    budget: _BUDGET,
    out: _OUT,
    query_set: _QUERY_SET = "fashion_mnist",
    query_split: _QUERY_SPLIT = "attacker",
    param: _PARAM = None,
    device: _DEVICE = "auto",
    test_size: _TEST_SIZE = 1000,
    references: Annotated[bool, typer.Option(help="also train the PGD-AT and plain references")] = True,
    data_root: _DATA_ROOT = None,
) -> None:
    """Robust Representation Matching (Vaishnavi et al., USENIX Security 2022): steal a robust
    victim's robustness through its embedding endpoint; compare with PGD adversarial training."""
    try:
        config = RobustnessStealingConfig(
            url=url,
            key=key,
            model=model,
            params=parse_params(param or []),
            query_set=query_set,
            query_split=query_split,
            budget=budget,
            out=out,
            device=device,
            test_size=test_size,
            references=references,
            data_root=data_root,
        )
        RRMParams.model_validate(config.params)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    record = steal_robustness(config)
    table = Table("student", "clean accuracy", "PGD accuracy", "training seconds", title="rrm")
    for name, scores in record["evaluation"]["students"].items():
        table.add_row(
            name,
            f"{scores['clean_accuracy']:.4f}",
            f"{scores['pgd_accuracy']:.4f}",
            f"{scores['train_seconds']:.1f}",
        )
    _console.print(table)
    queries = record["queries"]
    _console.print(
        f"queries spent (server): {queries['spent']} of budget {record['budget']} ({queries['cache_hits']} "
        f"cache hits); PGD eps {record['evaluation']['eps']}; result: {Path(out) / RESULT_FILE}"
    )

"""The ``stealrange attack <name>`` command of each built-in family's attacks.

Each family (:mod:`attacker_client.families`) may register a ``command(family, attack class)``
that builds the typer command of one of its attacks: the options every run shares (victim, key,
budget, run folder, query pool, ``-p`` parameters, device, the victim's checkpoint or store) and the
family's own (its evaluation spec, and shortcuts for common parameters). Every command builds the
family's run config, validates the attack's parameters before any query is spent, runs the family's
``steal`` and prints the result's :meth:`~attacker_client.runs.RunResult.summary`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from attacker_client.attacks import Attack
from attacker_client.runs import RESULT_FILE, VICTIM_STORE_ENV
from common import distributed
from common.params import parse_params

if TYPE_CHECKING:
    from attacker_client.families import AttackFamily

console = Console()

_URL = Annotated[str, typer.Option(envvar="STEALRANGE_URL", help="victim API base URL")]
_KEY = Annotated[str, typer.Option(envvar="STEALRANGE_API_KEY", help="API key (sr-...)")]
_BUDGET = Annotated[int, typer.Option(min=1, help="most queries (images) to spend")]
_OUT = Annotated[Path, typer.Option(help="run folder: surrogate(s), result.json, query cache")]
_QUERY_SET = Annotated[str, typer.Option(help="attacker's query images (a dataset name)")]
_QUERY_SPLIT = Annotated[
    str, typer.Option(help="train, test, or attacker (the pool the victim never trained on)")
]
_PARAM = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="attack parameter name=value (repeat)")
]
_DEVICE = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:i")]
_VICTIM = Annotated[Path | None, typer.Option(help="victim's checkpoint, for white-box reference scores")]
_VICTIM_STORE = Annotated[
    Path,
    typer.Option(
        envvar=VICTIM_STORE_ENV,
        help="the attacker's copy of the victim's model store: its checkpoint is used when its digest "
        "is the served version's and no --victim-checkpoint is given",
    ),
]
_DATA_ROOT = Annotated[Path | None, typer.Option(envvar="STEALRANGE_DATA_ROOT")]
_TEST_SIZE = Annotated[int, typer.Option(min=10, help="held-out test images scored")]


def execute(
    family: AttackFamily[Any, Any],
    cls: type[Attack],
    shared: dict[str, Any],
    evaluation: dict[str, Any],
) -> None:
    """Build the run config (the attack's parameters validated before any query), run, print."""
    try:
        config = family.config.model_validate({**shared, "attack": cls.name, "evaluation": evaluation})
        cls(config.params)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        result = family.steal(config)
    finally:
        distributed.shutdown()
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    for item in result.summary():
        console.print(item)
    console.print(f"result: {Path(config.out) / RESULT_FILE}")


def _described(
    command: Callable[..., None], cls: type[Attack], shortcuts: dict[str, str] | None = None
) -> Callable[..., None]:
    """``command`` with the attack's paper and docstring as its help, without the ``shortcuts``
    (option name -> parameter name) whose parameter the attack does not have."""
    drop = {option for option, param in (shortcuts or {}).items() if param not in cls.Params.model_fields}
    if drop:
        signature = inspect.signature(command, eval_str=True)
        inner = command

        def command(**options: Any) -> None:
            inner(**options, **dict.fromkeys(drop))

        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p for p in signature.parameters.values() if p.name not in drop]
        )
        command.__annotations__ = {k: v for k, v in inner.__annotations__.items() if k not in drop}
    command.__doc__ = f"{cls.paper}. {(cls.__doc__ or '').strip()}"
    return command


def encoder_command(family: AttackFamily[Any, Any], cls: type[Attack]) -> Callable[..., None]:
    """An encoder attack's command; its evaluation options fill :class:`~attacker_client.evaluate.EvalConfig`.

    Under ``torchrun`` every rank runs it (DDP), rank 0 alone queries and reports.
    """

    def command(
        url: _URL,
        key: _KEY,
        model: Annotated[str, typer.Option(help="victim encoder name")],
        budget: _BUDGET,
        out: _OUT,
        query_set: _QUERY_SET = "mnist5k",
        query_split: _QUERY_SPLIT = "train",
        param: _PARAM = None,
        device: _DEVICE = "auto",
        victim_checkpoint: _VICTIM = None,
        victim_store: _VICTIM_STORE = Path("model_store"),
        eval_sets: Annotated[
            str, typer.Option(help="downstream sets, comma-separated")
        ] = "fashion_mnist,mnist5k",
        probe_train_size: Annotated[int, typer.Option(min=10)] = 10_000,
        probe_epochs: Annotated[int, typer.Option(min=1)] = 100,
        mlp_probe: Annotated[bool, typer.Option(help="also train RDA's MLP probe")] = True,
        data_root: _DATA_ROOT = None,
    ) -> None:
        execute(
            family,
            cls,
            shared={
                "url": url,
                "key": key,
                "model": model,
                "params": parse_params(param or []),
                "query_set": query_set,
                "query_split": query_split,
                "budget": budget,
                "out": out,
                "device": device,
                "victim_checkpoint": victim_checkpoint,
                "victim_store": victim_store,
                "data_root": data_root,
            },
            evaluation={
                "downstream": [s.strip() for s in eval_sets.split(",") if s.strip()],
                "probe_train_size": probe_train_size,
                "probe_epochs": probe_epochs,
                "mlp_probe": mlp_probe,
                "data_root": data_root,
            },
        )

    return _described(command, cls)


def classifier_command(family: AttackFamily[Any, Any], cls: type[Attack]) -> Callable[..., None]:
    """A classifier attack's command: ``--output`` and, for attacks whose parameters have them
    (ensemble stealing), ``--method``, ``--members`` and ``-m`` as shortcuts for ``-p``."""

    def command(
        url: _URL,
        key: _KEY,
        model: Annotated[str, typer.Option(help="victim classifier name")],
        budget: _BUDGET,
        out: _OUT,
        method: Annotated[
            str | None,
            typer.Option(
                help="UQ method of ensemble stealing: deep_ensemble, mc_dropout, swag, bbb, laplace"
            ),
        ] = None,
        members: Annotated[
            int | None, typer.Option(min=2, help="ensemble stealing: members (networks or posterior samples)")
        ] = None,
        method_param: Annotated[
            list[str] | None, typer.Option("--method-param", "-m", help="UQ method parameter name=value")
        ] = None,
        query_set: _QUERY_SET = "fashion_mnist",
        query_split: _QUERY_SPLIT = "attacker",
        output: Annotated[str, typer.Option(help="auto, probabilities, top_k or label")] = "auto",
        param: _PARAM = None,
        device: _DEVICE = "auto",
        victim_checkpoint: _VICTIM = None,
        victim_store: _VICTIM_STORE = Path("model_store"),
        test_size: _TEST_SIZE = 2000,
        data_root: _DATA_ROOT = None,
    ) -> None:
        params: dict[str, Any] = {**parse_params(param or []), "output": output}
        if method is not None:
            params["method"] = method.replace("-", "_")
        if members is not None:
            params["members"] = members
        if method_param is not None:
            params["method_params"] = parse_params(method_param)
        execute(
            family,
            cls,
            shared={
                "url": url,
                "key": key,
                "model": model,
                "params": params,
                "query_set": query_set,
                "query_split": query_split,
                "budget": budget,
                "out": out,
                "device": device,
                "victim_checkpoint": victim_checkpoint,
                "victim_store": victim_store,
                "data_root": data_root,
            },
            evaluation={"test_size": test_size},
        )

    return _described(
        command, cls, {"method": "method", "members": "members", "method_param": "method_params"}
    )


def robustness_command(family: AttackFamily[Any, Any], cls: type[Attack]) -> Callable[..., None]:
    """A robustness attack's command: the students' test images and whether to train the references."""

    def command(
        url: _URL,
        key: _KEY,
        model: Annotated[str, typer.Option(help="victim encoder (an adversarially trained representation)")],
        budget: _BUDGET,
        out: _OUT,
        query_set: _QUERY_SET = "fashion_mnist",
        query_split: _QUERY_SPLIT = "attacker",
        param: _PARAM = None,
        device: _DEVICE = "auto",
        victim_checkpoint: _VICTIM = None,
        victim_store: _VICTIM_STORE = Path("model_store"),
        test_size: _TEST_SIZE = 1000,
        references: Annotated[bool, typer.Option(help="also train the PGD-AT and plain references")] = True,
        data_root: _DATA_ROOT = None,
    ) -> None:
        execute(
            family,
            cls,
            shared={
                "url": url,
                "key": key,
                "model": model,
                "params": parse_params(param or []),
                "query_set": query_set,
                "query_split": query_split,
                "budget": budget,
                "out": out,
                "device": device,
                "victim_checkpoint": victim_checkpoint,
                "victim_store": victim_store,
                "data_root": data_root,
            },
            evaluation={"test_size": test_size, "references": references},
        )

    return _described(command, cls)

"""Victim-side commands: ``serve``, ``up``, ``train-victim`` and ``keys`` (admin API over HTTP)."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

console = Console()
keys_app = typer.Typer(
    help="Manage API keys through the admin API (needs the admin token).", no_args_is_help=True
)

UrlOpt = Annotated[str, typer.Option(envvar="STEALRANGE_URL", help="base URL of the victim API")]
AdminOpt = Annotated[str, typer.Option(envvar="STEALRANGE_ADMIN_TOKEN", help="admin token")]


def _admin(url: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(
        method, f"{url.rstrip('/')}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30, **kwargs
    )
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text
        console.print(f"[red]error {response.status_code}[/red] {message}")
        raise typer.Exit(1)
    return response.json()


@keys_app.command("create")
def keys_create(
    url: UrlOpt = "http://127.0.0.1:8000",
    admin_token: AdminOpt = "",
    name: Annotated[str, typer.Option(help="a label")] = "",
    budget: Annotated[int, typer.Option(help="lifetime images; -1 = unlimited")] = 10_000,
    rate: Annotated[float, typer.Option(help="images per second; 0 = unlimited")] = 0.0,
    burst: Annotated[int, typer.Option(help="images at once")] = 1024,
    tier: Annotated[str, typer.Option(help="output-mode tier (label, standard, research)")] = "standard",
    model: Annotated[list[str] | None, typer.Option(help="allowed model (repeatable); default all")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Create a key; its secret is printed once."""
    spec = {
        "name": name,
        "budget": budget,
        "rate": rate,
        "burst": burst,
        "tier": tier,
        "models": model or ["*"],
    }
    created = _admin(url, admin_token, "POST", "/admin/keys", json=spec)
    if json_out:
        print(json.dumps(created))
    else:
        console.print(f"key id {created['record']['key_id']}: [bold]{created['api_key']}[/bold]")


@keys_app.command("list")
def keys_list(url: UrlOpt = "http://127.0.0.1:8000", admin_token: AdminOpt = "") -> None:
    """List keys with their budget, usage and rate."""
    table = Table("key id", "name", "tier", "budget", "used", "rate/s", "burst", "models", "revoked")
    for k in _admin(url, admin_token, "GET", "/admin/keys")["keys"]:
        table.add_row(
            k["key_id"],
            k["name"],
            k["tier"],
            str(k["budget"]),
            str(k["used"]),
            f"{k['rate']:g}",
            str(k["burst"]),
            ",".join(k["models"]),
            "yes" if k["revoked"] else "",
        )
    console.print(table)


@keys_app.command("show")
def keys_show(key_id: str, url: UrlOpt = "http://127.0.0.1:8000", admin_token: AdminOpt = "") -> None:
    """Show one key."""
    print(json.dumps(_admin(url, admin_token, "GET", f"/admin/keys/{key_id}"), indent=2))


@keys_app.command("revoke")
def keys_revoke(key_id: str, url: UrlOpt = "http://127.0.0.1:8000", admin_token: AdminOpt = "") -> None:
    """Revoke a key: refused from its next request on."""
    _admin(url, admin_token, "DELETE", f"/admin/keys/{key_id}")
    console.print(f"revoked {key_id}")


@keys_app.command("audit")
def keys_audit(
    key_id: str, url: UrlOpt = "http://127.0.0.1:8000", admin_token: AdminOpt = "", count: int = 100
) -> None:
    """Print a key's most recent audit events (JSON lines)."""
    for event in _admin(url, admin_token, "GET", f"/admin/keys/{key_id}/audit", params={"count": count}):
        print(json.dumps(event))


def _set_env(**values: object) -> None:
    for name, value in values.items():
        if value is not None:
            os.environ[f"STEALRANGE_{name.upper()}"] = str(value)


def serve(
    store: Annotated[Path, typer.Option(envvar="STEALRANGE_MODEL_STORE", help="model store folder")] = Path(
        "model_store"
    ),
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes (needs --redis-url if > 1)")] = 1,
    redis_url: Annotated[
        str | None, typer.Option(envvar="STEALRANGE_REDIS_URL", help="unset = embedded")
    ] = None,
    admin_token: Annotated[str | None, typer.Option(envvar="STEALRANGE_ADMIN_TOKEN")] = None,
) -> None:
    """Serve the victim API (settings from STEALRANGE_* env vars and these options)."""
    import uvicorn

    if workers > 1 and not redis_url:
        console.print(
            "[red]--workers > 1 needs --redis-url: the embedded Redis lives inside one process[/red]"
        )
        raise typer.Exit(2)
    _set_env(model_store=store, redis_url=redis_url, admin_token=admin_token)
    uvicorn.run("server.app:create_app", factory=True, host=host, port=port, workers=workers)


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
    from common.params import parse_params
    from experiments.victims import recipe_for, robust_recipe, train_victim

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


def up(
    store: Annotated[Path, typer.Option(envvar="STEALRANGE_MODEL_STORE")] = Path("model_store"),
    host: str = "127.0.0.1",
    port: int = 8000,
    budget: Annotated[int, typer.Option(help="budget of the demo key")] = 1000,
    rate: Annotated[float, typer.Option(help="images/s of the demo key")] = 50.0,
    burst: Annotated[int, typer.Option(help="burst of the demo key")] = 256,
    exit_after: Annotated[float | None, typer.Option(help="stop after N seconds (smoke tests)")] = None,
) -> None:
    """Train or reuse the quick victims, serve them (embedded Redis), make a demo key, show how to query."""
    import uvicorn

    from experiments.victims import quick_recipes, train_victim

    for recipe in quick_recipes().values():
        card = train_victim(recipe, store)
        console.print(f"victim [green]{card.name}[/green] ({card.kind}): {json.dumps(card.metrics)}")
    token = os.environ.get("STEALRANGE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    _set_env(model_store=store, admin_token=token)
    url = f"http://{host}:{port}"
    server = uvicorn.Server(
        uvicorn.Config("server.app:create_app", factory=True, host=host, port=port, log_level="warning")
    )

    def announce() -> None:
        while not server.started:
            time.sleep(0.05)
        spec = {"name": "demo", "budget": budget, "rate": rate, "burst": burst, "tier": "standard"}
        created = httpx.post(
            f"{url}/admin/keys", json=spec, headers={"Authorization": f"Bearer {token}"}
        ).json()
        key = created["api_key"]
        auth = '-H "Authorization: Bearer $KEY"'
        json_header = "-H 'content-type: application/json'"
        zeros = "$(python3 -c 'print([0]*784)')"
        lines = [
            f"[bold]stealrange victim API[/bold] on {url} (embedded Redis; docs at {url}/docs)",
            f"admin token: {token}",
            f"demo key:    {key}  (budget {budget} images, {rate:g} images/s, burst {burst})",
            "",
            f"  export KEY={key}",
            f"  curl -s {url}/v2/models/fmnist-classifier {auth}",
            f"  curl -s {url}/v2/models/fmnist-classifier/infer {auth} {json_header} \\",
            f'    -d "{{\\"inputs\\":[{{\\"name\\":\\"images\\",\\"shape\\":[1,1,28,28],'
            f'\\"datatype\\":\\"UINT8\\",\\"data\\":{zeros}}}]}}"',
            f"  curl -s {url}/v1/usage {auth}",
            f"  stealrange keys create --url {url} --admin-token {token} --budget 500 --rate 10",
        ]
        console.print("\n".join(lines), soft_wrap=True, highlight=False)
        if exit_after is not None:
            time.sleep(exit_after)
            server.should_exit = True

    threading.Thread(target=announce, daemon=True).start()
    server.run()

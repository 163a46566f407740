"""Victim-side commands: ``serve`` and ``keys`` (the admin API over HTTP)."""

from __future__ import annotations

import json
import os
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


def set_server_env(**values: object) -> None:
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
    redis_cluster: Annotated[
        bool | None,
        typer.Option(
            "--redis-cluster/--no-redis-cluster",
            envvar="STEALRANGE_REDIS_CLUSTER",
            help="--redis-url names one node of a Redis Cluster (redis-py's cluster client)",
        ),
    ] = None,
    admin_token: Annotated[str | None, typer.Option(envvar="STEALRANGE_ADMIN_TOKEN")] = None,
) -> None:
    """Serve the victim API (settings from STEALRANGE_* env vars and these options)."""
    import uvicorn

    from server.settings import KEEP_ALIVE_S

    if redis_cluster and not redis_url:
        console.print("[red]--redis-cluster needs --redis-url: the URL of one node of the cluster[/red]")
        raise typer.Exit(2)
    if workers > 1 and not redis_url:
        console.print(
            "[red]--workers > 1 needs --redis-url: the embedded Redis lives inside one process[/red]"
        )
        raise typer.Exit(2)
    set_server_env(
        model_store=store,
        redis_url=redis_url,
        redis_cluster=None if redis_cluster is None else str(redis_cluster).lower(),
        admin_token=admin_token,
    )
    uvicorn.run(
        "server.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_keep_alive=KEEP_ALIVE_S,
    )

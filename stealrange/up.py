"""``stealrange up``: train (or reuse) the quick victims, serve them, make a demo key, show how to
query them. It composes the victim recipes and the server, so it lives with the product's CLI."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
import uvicorn
from rich.console import Console

from server.cli import set_server_env
from victims.recipes import quick_recipes, train_victim

console = Console()


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
    for recipe in quick_recipes().values():
        card = train_victim(recipe, store)
        console.print(f"victim [green]{card.name}[/green] ({card.kind}): {json.dumps(card.metrics)}")
    token = os.environ.get("STEALRANGE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    set_server_env(model_store=store, admin_token=token)
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

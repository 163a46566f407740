"""The ``stealrange`` CLI: key management through the admin API of a live server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from typer.testing import CliRunner

from stealrange.cli import app
from tests.conftest import ADMIN_TOKEN, run_live_server

runner = CliRunner()


def test_keys_commands_against_a_live_server(model_store: Path) -> None:
    with run_live_server(model_store, None) as url:
        opts = ["--url", url, "--admin-token", ADMIN_TOKEN]
        created = runner.invoke(
            app,
            [
                "keys",
                "create",
                *opts,
                "--budget",
                "7",
                "--rate",
                "2",
                "--json",
                "--model",
                "clf",
                "--tier",
                "label",
            ],
        )
        assert created.exit_code == 0, created.output
        record = json.loads(created.output)
        key_id, api_key = record["record"]["key_id"], record["api_key"]
        assert record["record"]["models"] == ["clf"] and record["record"]["budget"] == 7

        usage = httpx.get(f"{url}/v1/usage", headers={"X-API-Key": api_key}).json()
        assert usage["remaining"] == 7 and usage["tier"] == "label"

        listed = runner.invoke(app, ["keys", "list", *opts])
        assert listed.exit_code == 0 and key_id[:6] in listed.output and api_key not in listed.output
        shown = runner.invoke(app, ["keys", "show", key_id, *opts])
        assert json.loads(shown.output)["key_id"] == key_id

        assert runner.invoke(app, ["keys", "revoke", key_id, *opts]).exit_code == 0
        assert httpx.get(f"{url}/v1/usage", headers={"X-API-Key": api_key}).status_code == 401
        assert runner.invoke(app, ["keys", "audit", key_id, *opts]).exit_code == 0

        wrong = runner.invoke(app, ["keys", "list", "--url", url, "--admin-token", "nope"])
        assert wrong.exit_code == 1 and "invalid_admin_token" in wrong.output


def test_serve_refuses_a_cluster_without_a_node_url() -> None:
    result = runner.invoke(app, ["serve", "--redis-cluster"], env={"STEALRANGE_REDIS_URL": ""})
    assert result.exit_code == 2 and "--redis-url" in result.output


def test_serve_refuses_several_workers_on_embedded_redis() -> None:
    result = runner.invoke(app, ["serve", "--workers", "2"], env={"STEALRANGE_REDIS_URL": ""})
    assert result.exit_code == 2 and "--redis-url" in result.output

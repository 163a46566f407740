"""Test harness: a real redis-server on a free loopback port, a tiny model store, both backends.

- ``redis_url``: a redis-server the harness starts itself (session-wide), on a free port.
- ``redis_cluster_url``: a Redis Cluster of three masters the harness starts itself (session-wide,
  on free loopback ports; :mod:`tests.redis_servers`); skipped only where redis-server or redis-cli
  is not installed.
- ``backend``: parametrises a test over the embedded fakeredis and that real Redis.
- ``model_store``: two untrained small CNNs (a classifier ``clf`` and an encoder ``enc``) on 1x28x28.
- ``make_client``: a TestClient for ``create_app(settings)`` on the chosen backend, isolated by a
  fresh Redis key prefix per test.
- ``live_server``: uvicorn in a subprocess (N workers) against the real Redis, for tests where the
  network and several processes matter.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from common.checkpoints import InputSpec, card_for, save_checkpoint
from common.models import build_model
from experiments.victim_process import victim_process
from server.app import create_app
from server.settings import ServerSettings
from tests.redis_servers import RedisStartError, missing_binaries, redis_cluster, redis_single

ADMIN_TOKEN = "test-admin-token"
# One intra-op thread: on 2 shared cores, torch's thread pool contending with other work makes tiny
# tests erratic; one thread keeps them fast and deterministic.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server started by the harness on a free loopback port."""
    try:
        with redis_single(tmp_path_factory.mktemp("redis")) as node:
            yield node.url
    except RedisStartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of one node of a three-master Redis Cluster on loopback, torn down after the session."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"a Redis Cluster needs {' and '.join(missing)} (scripts/install.sh installs them)")
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two untrained 1x28x28 small CNNs: classifier ``clf`` (10 classes) and encoder ``enc``."""
    store = tmp_path_factory.mktemp("model_store")
    spec = InputSpec(channels=1, height=28, width=28)
    torch.manual_seed(0)
    clf = build_model("classifier", "small_cnn", 1, [0.5], [0.5])
    save_checkpoint(
        clf, card_for(clf, "clf", "small_cnn", input=spec, classes=[str(i) for i in range(10)]), store / "clf"
    )
    enc = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=64)
    save_checkpoint(enc, card_for(enc, "enc", "small_cnn", input=spec), store / "enc")
    return store


@pytest.fixture(params=["fakeredis", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """The Redis URL of the backend under test: None = embedded fakeredis, else the real server."""
    if request.param == "fakeredis":
        return None
    return request.getfixturevalue("redis_url")


def make_settings(model_store: Path, redis_url: str | None, **overrides: Any) -> ServerSettings:
    return ServerSettings(
        model_store=model_store,
        redis_url=redis_url,
        admin_token=ADMIN_TOKEN,
        redis_prefix=f"t{uuid.uuid4().hex[:10]}",
        **overrides,
    )


@pytest.fixture
def make_client(model_store: Path, backend: str | None) -> Iterator[Callable[..., TestClient]]:
    """Factory of TestClients on the parametrised backend; settings overridable per call."""
    clients: list[TestClient] = []

    def factory(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(model_store, backend, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def create_key(client: TestClient | httpx.Client, **spec: Any) -> tuple[str, dict[str, str]]:
    """Create a key through the admin API; returns (key_id, auth headers)."""
    response = client.post("/admin/keys", json=spec, headers=admin_headers())
    assert response.status_code == 201, response.text
    api_key = response.json()["api_key"]
    return response.json()["record"]["key_id"], {"Authorization": f"Bearer {api_key}"}


@contextmanager
def run_live_server(model_store: Path, redis_url: str | None, workers: int = 1, **env: str) -> Iterator[str]:
    """uvicorn in its own process group serving ``create_app`` on a free port; yields its URL."""
    environment = {
        "STEALRANGE_ADMIN_TOKEN": ADMIN_TOKEN,
        "STEALRANGE_REDIS_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "STEALRANGE_TORCH_THREADS": "1",
        **env,
    }
    with victim_process(model_store, redis_url, workers=workers, env=environment) as url:
        yield url


def error_of(response: httpx.Response) -> dict[str, str]:
    """``{"type", "code", "message"}`` of an error body in either protocol's shape: KServe v2's
    ``{"error": "<message>", "code", "type"}`` or OpenAI's ``{"error": {"message", "type", ...}}``."""
    body = response.json()
    if isinstance(body.get("error"), str):
        return {"type": body["type"], "code": body["code"], "message": body["error"]}
    return {k: body["error"][k] for k in ("type", "code", "message")}

"""The per-worker key cache of charged requests (server.keys): it saves the record's Redis lookup,
never a revocation or a budget check, holds only keys found in Redis, and stays bounded."""

from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.wire import infer_request
from server.app import create_app
from server.keys import KeyStore
from tests.conftest import admin_headers, create_key, error_of, make_settings

INFER = "/v2/models/clf/infer"


def infer(client: TestClient, auth: dict[str, str], n: int = 1) -> Any:
    images = np.zeros((n, 1, 28, 28), dtype=np.uint8)
    body, extra = infer_request(images, ["probabilities"], binary=True)
    return client.post(INFER, content=body, headers={**auth, **extra})


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key ids whose records were read from Redis, in order."""
    seen: list[str] = []
    original = KeyStore._load

    async def counted(self: KeyStore, key_id: str) -> Any:
        seen.append(key_id)
        return await original(self, key_id)

    monkeypatch.setattr(KeyStore, "_load", counted)
    return seen


def test_charged_requests_reuse_the_record_and_usage_reads_redis(make_client: Any, loads: list[str]) -> None:
    client = make_client(key_cache_ttl_s=60)
    key_id, auth = create_key(client, budget=10)
    loads.clear()
    for _ in range(3):
        assert infer(client, auth).status_code == 200
    assert loads == [key_id]  # one lookup, then the cache
    usage = client.get("/v1/usage", headers=auth)
    assert usage.json()["used"] == 3  # /v1/usage reads Redis: the budget is never a cached figure
    assert loads == [key_id, key_id]


def test_a_revoked_key_is_refused_at_once_in_every_worker(model_store: Path, redis_url: str) -> None:
    """Two apps (two workers) on one Redis, both with the key cached for a minute: revoked through
    one, the key's next charged request is refused by the other too, and charges nothing."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = make_settings(model_store, redis_url, key_cache_ttl_s=60)
    settings = settings.model_copy(update={"redis_prefix": prefix})
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        key_id, auth = create_key(first, budget=10)
        assert infer(first, auth).status_code == 200
        assert infer(second, auth).status_code == 200
        assert first.delete(f"/admin/keys/{key_id}", headers=admin_headers()).status_code == 200
        for client in (second, first):
            refused = infer(client, auth)
            assert refused.status_code == 401, refused.text
            assert error_of(refused)["code"] == "invalid_api_key"
        record = first.get(f"/admin/keys/{key_id}", headers=admin_headers()).json()
        assert record["used"] == 2 and record["revoked"] is True


def test_the_budget_is_exact_with_the_record_cached(make_client: Any) -> None:
    client = make_client(key_cache_ttl_s=60)
    _, auth = create_key(client, budget=3)
    assert [infer(client, auth).status_code for _ in range(5)] == [200, 200, 200, 429, 429]
    assert client.get("/v1/usage", headers=auth).json()["used"] == 3


def test_unknown_keys_and_wrong_secrets_are_not_cached(make_client: Any, loads: list[str]) -> None:
    client = make_client(key_cache_ttl_s=60)
    key_id, auth = create_key(client)
    store: KeyStore = client.app.state.keys
    for _ in range(20):  # random ids: each is looked up, none is kept
        fake = f"sr-{secrets.token_hex(8)}-{secrets.token_urlsafe(32)}"
        assert infer(client, {"Authorization": f"Bearer {fake}"}).status_code == 401
    assert len(store._cache) == 0
    wrong = f"sr-{key_id}-{secrets.token_urlsafe(32)}"  # a real id with a wrong secret
    assert infer(client, {"Authorization": f"Bearer {wrong}"}).status_code == 401
    assert infer(client, auth).status_code == 200
    assert infer(client, {"Authorization": f"Bearer {wrong}"}).status_code == 401  # cached record, same 401
    assert list(store._cache) == [key_id]


def test_the_cache_is_bounded_and_expires(make_client: Any, loads: list[str]) -> None:
    client = make_client(key_cache_ttl_s=0.2, key_cache_size=2)
    keys = [create_key(client) for _ in range(3)]
    loads.clear()
    for _, auth in keys:
        assert infer(client, auth).status_code == 200
    store: KeyStore = client.app.state.keys
    assert list(store._cache) == [keys[1][0], keys[2][0]]  # least recently used out
    assert infer(client, keys[2][1]).status_code == 200
    assert len(loads) == 3
    time.sleep(0.3)
    assert infer(client, keys[2][1]).status_code == 200  # expired: read again
    assert len(loads) == 4


def test_ttl_zero_reads_redis_every_time(make_client: Any, loads: list[str]) -> None:
    client = make_client(key_cache_ttl_s=0)
    key_id, auth = create_key(client)
    loads.clear()
    for _ in range(3):
        assert infer(client, auth).status_code == 200
    assert loads == [key_id] * 3


def test_inference_reads_the_key_as_every_other_route(make_client: Any) -> None:
    """The inference routes read the presented key themselves (server.deps.presented_key), the
    other routes through FastAPI's HTTPBearer and APIKeyHeader: the same headers pass or fail both."""
    client = make_client()
    _, auth = create_key(client)
    api_key = auth["Authorization"].removeprefix("Bearer ")
    cases = [
        {"Authorization": f"Bearer {api_key}"},
        {"Authorization": f"bearer {api_key}"},
        {"Authorization": f"BEARER {api_key}"},
        {"X-API-Key": api_key},
        {"Authorization": f"Basic {api_key}", "X-API-Key": api_key},
        {"Authorization": "Bearer ", "X-API-Key": api_key},
        {"Authorization": "Bearer", "X-API-Key": api_key},
        {"Authorization": f"Bearer {api_key}x", "X-API-Key": api_key},
        {"Authorization": f"Token {api_key}"},
        {"Authorization": f"Bearer  {api_key}"},
        {"Authorization": f"Bearer {api_key} "},
        {"Authorization": f" Bearer {api_key}"},
        {"Authorization": f"Bearer\t{api_key}"},
        {},
    ]
    for headers in cases:
        usage = client.get("/v1/usage", headers=headers).status_code
        inference = infer(client, headers).status_code
        assert (usage, inference) in ((200, 200), (401, 401)), headers

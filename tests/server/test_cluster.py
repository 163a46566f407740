"""The API on a real Redis Cluster (three masters on loopback, started by the harness).

- Two uvicorn workers on the cluster: a key's budget is spent exactly under concurrent load (no
  over-spend, every refusal ``budget_exhausted``, every charge audited once), and keys whose records
  sit on every master are all listed.
- B4B's coverage bitmap and PRADA's lock, sets and flag, shared by the two workers on the cluster.
- In process: readiness, secrets, refunds of failed inference, statistics, revocation and the
  reload of the Lua scripts after SCRIPT FLUSH on every node.
- The cluster client waits for a free connection (redis-py's own fails), re-entrantly; a cluster
  that is gone gets 503 ``accounting_unavailable``, as one Redis down does.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError
from redis.asyncio import BlockingConnectionPool, Redis
from redis.cluster import RedisCluster as SyncRedisCluster

from common.wire import infer_request
from defenses.config import DefenseConfig, write_defense_config
from server.accounting import Accounting
from server.app import create_app
from server.redis_client import ClusterClient, cluster_client, make_redis
from server.settings import ServerSettings
from tests.conftest import admin_headers, create_key, error_of, make_settings, run_live_server
from tests.redis_servers import missing_binaries, redis_cluster
from tests.server.test_concurrency import BUDGET, assert_budget_spent_exactly, hammer
from tests.server.test_stateful_api import (
    PRADA,
    SECRET,
    attack_stream,
    honest_stream,
    local_buckets,
    send_all,
)

CLUSTER_ENV = {"STEALRANGE_REDIS_CLUSTER": "true", "STEALRANGE_SERVER_SECRET": SECRET}


@pytest.fixture(scope="module")
def cluster_store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``clf`` undefended (the exactness test), ``enc`` under B4B with PRADA refusing flagged keys."""
    store = tmp_path_factory.mktemp("cluster_store") / "store"
    shutil.copytree(model_store, store)
    write_defense_config(
        store / "enc",
        DefenseConfig(default=[{"name": "b4b", "n_bits": 8}], detector={**PRADA, "action": "refuse"}),
    )
    return store


@pytest.fixture(scope="module")
def cluster_server(cluster_store: Path, redis_cluster_url: str) -> Iterator[str]:
    """Two uvicorn workers of the API on the cluster; yields the API's URL."""
    with run_live_server(cluster_store, redis_cluster_url, workers=2, **CLUSTER_ENV) as url:
        yield url


@pytest.fixture(scope="module")
def nodes(redis_cluster_url: str) -> Iterator[SyncRedisCluster]:
    """A plain (sync) cluster client, to see which master holds what."""
    client = SyncRedisCluster.from_url(redis_cluster_url)
    yield client
    client.close()


def master_of(nodes: SyncRedisCluster, key_id: str) -> str:
    """The master holding an API key's records: its hash tag ``{key_id}`` decides the slot."""
    return nodes.get_node_from_key(f"{{{key_id}}}").name


def test_budget_exact_and_keys_listed_across_two_workers(
    cluster_server: str, nodes: SyncRedisCluster
) -> None:
    masters = {node.name for node in nodes.get_primaries()}
    assert len(masters) == 3
    with httpx.Client(base_url=cluster_server) as admin:
        key_id, headers = create_key(admin, budget=BUDGET)
        responses = asyncio.run(hammer(cluster_server, headers))
        usage = admin.get("/v1/usage", headers=headers).json()
        audit = admin.get(
            f"/admin/keys/{key_id}/audit", params={"count": 2000}, headers=admin_headers()
        ).json()

        # More keys, until their records sit on every master (a random id lands on a random slot).
        created = {key_id: master_of(nodes, key_id)}
        while set(created.values()) != masters and len(created) < 200:
            other, _ = create_key(admin, budget=7)
            created[other] = master_of(nodes, other)
        listed = admin.get("/admin/keys", headers=admin_headers()).json()["keys"]

    # Exactly as many images charged as served, never above the budget; refusals charged nothing.
    assert_budget_spent_exactly(responses, usage, audit)

    assert set(created.values()) == masters
    by_id = {record["key_id"]: record for record in listed}
    assert set(by_id) == set(created)
    assert by_id[key_id]["used"] == usage["used"]
    assert all(by_id[k]["budget"] == 7 and by_id[k]["used"] == 0 for k in created if k != key_id)


def test_b4b_and_prada_state_shared_by_two_workers(
    cluster_server: str, cluster_store: Path, nodes: SyncRedisCluster
) -> None:
    honest, attack = honest_stream(120), attack_stream(200)
    with httpx.Client(base_url=cluster_server) as admin:
        honest_id, honest_headers = create_key(admin, budget=10_000)
        codes = asyncio.run(send_all(cluster_server, honest_headers, "enc", list(np.split(honest, 24))))
        assert codes == [200] * 24
        enc = admin.get(f"/admin/keys/{honest_id}/defenses", headers=admin_headers()).json()["models"]["enc"]
        # One sequence of queries across both workers (PRADA's lock held on the key's master)...
        assert enc["prada"]["distances"] == 119
        assert enc["prada"]["flag"] is None
        # ...and one coverage bitmap, wherever each request ran.
        assert enc["b4b"]["occupied_buckets"] == len(local_buckets(cluster_store, honest))

        thief_id, thief_headers = create_key(admin, budget=10_000)
        codes = asyncio.run(send_all(cluster_server, thief_headers, "enc", list(np.split(attack, 20))))
        assert codes[0] == 200 and set(codes) <= {200, 403} and 403 in codes
        record = admin.get(f"/admin/keys/{thief_id}", headers=admin_headers()).json()
        assert record["used"] == codes.count(200) * 10  # refused requests were not charged
        flags = admin.get(f"/admin/keys/{thief_id}/defenses", headers=admin_headers()).json()["flags"]
        assert flags["enc"]["detector"] == "prada"
        body, extra = infer_request(attack[:2], ["embedding"], binary=True)
        refused = admin.post("/v2/models/enc/infer", content=body, headers={**thief_headers, **extra})
        assert refused.status_code == 403 and error_of(refused)["code"] == "extraction_suspected"
    # The state of both keys lives in their own slots, on the masters their ids hash to.
    for key_id in (honest_id, thief_id):
        node = nodes.get_node_from_key(f"{{{key_id}}}")
        on_node = nodes.keys(target_nodes=node)
        assert any(f"{{{key_id}}}:b4b:enc".encode() in k for k in on_node)
        assert any(f"{{{key_id}}}:prada:enc:d".encode() in k for k in on_node)


def test_in_process_app_on_the_cluster(
    model_store: Path, redis_cluster_url: str, nodes: SyncRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness, generated secrets, a refunded failure, usage, statistics, revocation, and the
    scripts reloaded after SCRIPT FLUSH on every master, on the cluster client the settings ask for."""
    settings = make_settings(model_store, redis_cluster_url, redis_cluster=True)
    infer = "/v2/models/clf/infer"
    body, extra = infer_request(np.zeros((3, 1, 28, 28), np.uint8), ["label"])
    with TestClient(create_app(settings)) as client:
        assert isinstance(client.app.state.redis, ClusterClient)
        assert client.get("/v2/health/ready").status_code == 200
        stored = nodes.hgetall(f"{settings.redis_prefix}:server-secrets")
        assert set(stored) == {b"key_pepper", b"server_secret"}  # drawn once, kept on the cluster
        key_id, auth = create_key(client, budget=8)
        assert client.post(infer, content=body, headers={**auth, **extra}).status_code == 200

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the accelerator fell over")

        monkeypatch.setattr(client.app.state.registry.models["clf"], "forward", broken)
        failed = client.post(infer, content=body, headers={**auth, **extra})
        assert failed.status_code == 503 and error_of(failed)["code"] == "inference_failed"
        monkeypatch.undo()
        events = client.get(f"/admin/keys/{key_id}/audit", headers=admin_headers()).json()
        assert [(e["event"], e["n"]) for e in events] == [("charge", "3"), ("charge", "3"), ("refund", "3")]
        assert client.get("/v1/usage", headers=auth).json()["used"] == 3

        for node in nodes.get_primaries():  # every master forgets the scripts: NOSCRIPT, reload
            node.redis_connection.script_flush()
        assert client.post(infer, content=body, headers={**auth, **extra}).status_code == 200
        over = client.post(infer, content=body, headers={**auth, **extra})
        assert over.status_code == 429 and error_of(over)["code"] == "budget_exhausted"
        assert client.get("/v1/usage", headers=auth).json()["used"] == 6

        stats = client.get("/v2/models/clf/stats", headers=auth).json()["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 2
        assert stats["inference_stats"]["fail"]["count"] == 1 and stats["inference_count"] == 6

        assert client.delete(f"/admin/keys/{key_id}", headers=admin_headers()).json()["revoked"] is True
        assert client.post(infer, content=body, headers={**auth, **extra}).status_code == 401


def test_cluster_down_is_503_not_500(model_store: Path, tmp_path: Path) -> None:
    """With every master gone, a request gets 503 ``accounting_unavailable`` (as with one Redis
    down) and readiness fails, where redis-py's bare cluster exception would give a 500."""
    if missing_binaries():
        pytest.skip(f"a Redis Cluster needs {' and '.join(missing_binaries())}")
    doomed = redis_cluster(tmp_path / "doomed")
    url, running = doomed.__enter__(), True
    try:
        with TestClient(create_app(make_settings(model_store, url, redis_cluster=True))) as client:
            _, auth = create_key(client, budget=10)
            body, extra = infer_request(np.zeros((1, 1, 28, 28), np.uint8), ["label"])
            infer = lambda: client.post("/v2/models/clf/infer", content=body, headers={**auth, **extra})  # noqa: E731
            assert infer().status_code == 200
            doomed.__exit__(None, None, None)
            running = False
            down = infer()
            assert down.status_code == 503 and error_of(down)["code"] == "accounting_unavailable"
            assert down.headers["retry-after"] == "1"
            assert client.get("/v2/health/ready").status_code == 503
    finally:
        if running:
            doomed.__exit__(None, None, None)


def charge_burst(url: str, concurrency: int, **client_kwargs: Any) -> tuple[int, list[int]]:
    """``concurrency`` one-image charges at once on a fresh key through a :class:`ClusterClient`;
    returns the key's ``used`` and, per master, the command connections the client holds there."""
    name = f"gate-{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[int, list[int]]:
        client = ClusterClient.from_url(url, client_name=name, **client_kwargs)
        try:
            accounting = Accounting(client, prefix=f"t{uuid.uuid4().hex[:8]}")
            key_id = uuid.uuid4().hex[:16]
            await client.hset(accounting.key_hash(key_id), mapping={"budget": -1, "used": 0})
            results = await asyncio.gather(
                *(accounting.charge(key_id, 1, "m", "label", f"r{i}") for i in range(concurrency))
            )
            assert all(r.ok for r in results)
            used = int(await client.hget(accounting.key_hash(key_id), "used"))
            clients = await client.client_list(target_nodes=ClusterClient.PRIMARIES)
            # The seed node's topology connection (CLUSTER SLOTS) is not one of the command pool's.
            pooled = [
                sum(1 for c in node if c["name"] == name and c["cmd"] != "cluster|slots")
                for node in clients.values()
            ]
            return used, pooled
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_cluster_client_waits_for_a_free_connection(redis_cluster_url: str) -> None:
    used, per_master = charge_burst(redis_cluster_url, 100, max_in_flight=2, wait_timeout=10.0)
    assert used == 100
    assert max(per_master) <= 2 and sum(per_master) >= 1


def test_a_burst_of_first_commands_on_a_fresh_client(redis_cluster_url: str) -> None:
    """A worker's first burst: 64 charges at once on a client that has not discovered the cluster
    yet. Plain redis-py 8.1 fails some of them (a connection recycled during discovery); the
    server's client runs one command at a time until discovery is done."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> list[BaseException]:
        setup = ClusterClient.from_url(redis_cluster_url, max_in_flight=8, wait_timeout=10.0)
        ids = [uuid.uuid4().hex[:16] for _ in range(64)]
        for key_id in ids:
            await setup.hset(Accounting(setup, prefix).key_hash(key_id), mapping={"budget": -1, "used": 0})
        await setup.aclose()
        failures: list[BaseException] = []
        for _ in range(20):
            client = ClusterClient.from_url(redis_cluster_url, max_in_flight=64, wait_timeout=10.0)
            accounting = Accounting(client, prefix)
            try:
                results = await asyncio.gather(
                    *(accounting.charge(k, 1, "m", "label", "first") for k in ids), return_exceptions=True
                )
            finally:
                await client.aclose()
            failures += [r for r in results if isinstance(r, BaseException)]
        return failures

    assert asyncio.run(main()) == []


def test_cluster_client_gate_times_out_and_is_reentrant(redis_cluster_url: str) -> None:
    async def main() -> None:
        client = ClusterClient.from_url(redis_cluster_url, max_in_flight=1, wait_timeout=0.2)
        held, done = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with client.slot():
                assert await client.ping()  # the holder's own commands do not wait for a second slot
                held.set()
                await done.wait()

        try:
            task = asyncio.create_task(holder())
            await held.wait()
            with pytest.raises(redis.ConnectionError, match="no Redis Cluster connection free"):
                await client.ping()
            done.set()
            await task
            assert await client.ping()  # the slot is free again
        finally:
            await client.aclose()

    asyncio.run(main())


def test_settings_choose_the_client(model_store: Path) -> None:
    with pytest.raises(ValidationError, match="redis_cluster needs redis_url"):
        ServerSettings(model_store=model_store, redis_cluster=True)
    with pytest.raises(ValueError, match="only database 0"):
        cluster_client("redis://127.0.0.1:6379/2", 4, 1.0)
    single = make_redis(ServerSettings(model_store=model_store, redis_url="redis://127.0.0.1:6379/0"))
    assert type(single) is Redis and isinstance(single.connection_pool, BlockingConnectionPool)
    cluster = make_redis(
        ServerSettings(model_store=model_store, redis_url="redis://127.0.0.1:6379/0", redis_cluster=True)
    )
    assert isinstance(cluster, ClusterClient)
    assert isinstance(make_redis(ServerSettings(model_store=model_store)), fakeredis.FakeAsyncRedis)

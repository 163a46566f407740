"""The server's Redis client, built from its settings: one Redis, a Redis Cluster, or embedded.

- ``redis_url`` unset: an embedded in-process Redis (fakeredis, running the same Lua scripts), for
  one worker process.
- ``redis_url`` set: redis-py's asyncio client on a :class:`~redis.asyncio.BlockingConnectionPool`
  (at most ``redis_max_connections`` per worker; a burst waits up to ``redis_timeout`` s for a free
  connection instead of failing).
- ``redis_url`` set and ``redis_cluster`` true: redis-py's asyncio :class:`RedisCluster`, seeded by
  the one node the URL names (the other nodes and the slot map are discovered from it). Every
  multi-key operation of the server keeps its keys in one hash slot (one API key's keys share the
  hash tag ``{key_id}``); pipelines over several slots (statistics, key listing) are split per node
  by redis-py, and PING goes to every node, so readiness means the whole cluster answers.

redis-py's cluster client has no blocking pool: a node with all its connections busy fails the
command (``MaxConnectionsError``). :class:`ClusterClient` restores the single-node behaviour: at
most ``redis_max_connections`` commands (or pipelines) of a worker are in flight at once, each using
at most one connection per node, so a node's pool is never exhausted (the seed node also keeps
the connection that discovered the slot map), and a burst waits for a free slot for up to
``redis_timeout`` s, then fails with the ConnectionError the blocking pool raises. A cluster none
of whose nodes answers raises that ConnectionError too, so the API answers 503 as on one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import fakeredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.settings import ServerSettings

RedisClient: TypeAlias = Redis | RedisCluster
"""What the server's stores accept: a single-node (or embedded) client, or a cluster client."""

# True inside a gated command of this task: a command redis-py issues from within another (a
# pipeline's per-command retry after a MOVED redirection) must not wait for a second slot.
_HOLDING: contextvars.ContextVar[bool] = contextvars.ContextVar("stealrange_redis_gate", default=False)


class ClusterClient(RedisCluster):
    """redis-py's asyncio cluster client whose commands wait for a free connection (see the module)."""

    def __init__(self, *args: Any, max_in_flight: int, wait_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "max_connections": max_in_flight})
        self._gate = asyncio.Semaphore(max_in_flight)
        self._wait_timeout = wait_timeout
        self._discovering = asyncio.Lock()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``max_in_flight`` slots (re-entrant within a task). A cluster none of
        whose nodes can be reached raises :class:`redis.ConnectionError`, as one Redis down does
        (redis-py raises a bare ``RedisClusterException``), so the API answers 503 alike."""
        if _HOLDING.get():
            yield
            return
        try:
            async with asyncio.timeout(self._wait_timeout):
                await self._gate.acquire()
        except TimeoutError:
            raise RedisConnectionError(
                f"no Redis Cluster connection free within {self._wait_timeout:g} s"
            ) from None
        token = _HOLDING.set(True)
        # While redis-py (re)discovers the cluster (first use, or after a connection error), its
        # node objects are replaced and their connections recycled: commands that start meanwhile
        # race with that and may fail (AttributeError on a connection closed under them, seen with
        # redis-py 8.1 on a burst of first commands). Until discovery is done, one at a time.
        discovering = self._discovering if getattr(self, "_initialize", False) else contextlib.nullcontext()
        try:
            async with discovering:
                yield
        except RedisClusterException as exc:
            if isinstance(exc.__cause__, RedisConnectionError | RedisTimeoutError):
                raise RedisConnectionError(str(exc)) from exc
            raise
        finally:
            _HOLDING.reset(token)
            self._gate.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.slot():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        """A cluster pipeline whose ``execute`` holds one slot (``transaction=True``: MULTI/EXEC, every
        key in one slot, as redis-py's cluster transactions require)."""
        if shard_hint:
            raise ValueError("shard_hint is not supported on a Redis Cluster")
        # redis-py's stubs mark ClusterPipeline abstract (an attribute set by its own __init__).
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]


class _GatedPipeline(ClusterPipeline):
    """A :class:`ClusterPipeline` of a :class:`ClusterClient`: one slot for the whole execution."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, ClusterClient)
        async with client.slot():
            return await super().execute(raise_on_error, allow_redirections)


def cluster_client(url: str, max_connections: int, timeout: float) -> ClusterClient:
    """A :class:`ClusterClient` seeded by the node at ``url`` (``redis://`` or ``rediss://``, db 0)."""
    parsed = parse_url(url)
    if parsed.get("db"):
        raise ValueError(f"a Redis Cluster has only database 0; the URL asks for {parsed['db']}")
    if "path" in parsed:
        raise ValueError("a Redis Cluster is reached over TCP, not a unix socket")
    client = ClusterClient.from_url(url, max_in_flight=max_connections, wait_timeout=timeout)
    assert isinstance(client, ClusterClient)  # from_url is a classmethod: cls(...)
    return client


def make_redis(settings: ServerSettings) -> RedisClient:
    """The client the settings ask for: a cluster, one Redis, or the embedded one (fakeredis + Lua)."""
    if settings.redis_url and settings.redis_cluster:
        return cluster_client(settings.redis_url, settings.redis_max_connections, settings.redis_timeout)
    if settings.redis_url:
        pool = BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections, timeout=settings.redis_timeout
        )
        return Redis(connection_pool=pool)
    if settings.redis_cluster:
        raise ValueError("redis_cluster needs redis_url: the URL of one node of the cluster")
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())

"""Where stateful defenses and detectors keep per-key state: Redis, shared by every worker.

Every Redis key of one API key's defense state carries the API key's hash tag (``sr:{key_id}:...``,
as the accounting does), so a Lua script that touches them runs unchanged on Redis Cluster, and a
key's state lives beside its budget. Nothing is kept in a worker's memory that another worker would
need: two uvicorn workers (or two replicas) on one Redis see one state, and so do workers on one
Redis Cluster (redis-py's cluster client): every script, transaction and pipeline of a defense
touches the keys of one API key only, so one hash slot, one node.
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript


class DefenseStore:
    """An async Redis client, the key prefix, and the Lua scripts defenses register once."""

    def __init__(self, redis: Redis | RedisCluster, prefix: str = "sr") -> None:
        self.redis = redis
        self.prefix = prefix
        self._scripts: dict[str, AsyncScript] = {}

    def key(self, key_id: str, *parts: str) -> str:
        """``sr:{key_id}:part:part``: a Redis key in the API key's hash slot."""
        return ":".join([f"{self.prefix}:{{{key_id}}}", *parts])

    def script(self, name: str, source: str) -> AsyncScript:
        """The registered script ``name`` (registered on first use; EVALSHA, reloaded on NOSCRIPT)."""
        if name not in self._scripts:
            self._scripts[name] = self.redis.register_script(source)
        return self._scripts[name]

    def flags_key(self, key_id: str) -> str:
        """Hash of a key's flags: model -> JSON record of the detection (see the PRADA detector)."""
        return self.key(key_id, "flags")

    async def flags(self, key_id: str) -> dict[str, dict[str, Any]]:
        """Every flag raised on a key, by model."""
        raw = await self.redis.hgetall(self.flags_key(key_id))
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    async def run(self, name: str, source: str, keys: list[str], args: list[Any]) -> Any:
        return await self.script(name, source)(keys=keys, args=args)

"""The server's secrets: configured, or generated at random once and shared through Redis.

Threat model (see the README): an attacker knows the code, the papers and every default; never a
secret. So no secret has a usable default. ``server_secret`` keys the deterministic per-(key,
input) defense noise and B4B's per-key transforms: knowing it, an attacker recomputes the noise and
removes it, or inverts the transform. ``key_pepper`` is mixed into the stored API-key hashes.

When a secret is not configured (``STEALRANGE_SERVER_SECRET`` / ``STEALRANGE_KEY_PEPPER``), the first
worker or replica to start draws 32 random bytes and stores them with ``HSETNX`` in the Redis hash
``<prefix>:server-secrets``; every other worker and replica on that Redis reads the same value, and
restarts keep it (so stored key hashes stay valid). The value is never logged. A secret kept in
Redis is as safe as Redis: whoever can read Redis can read it, and the key hashes beside it. To keep
the pepper out of a Redis dump, configure it; a configured value always wins over a stored one.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from pydantic import SecretStr

from server.accounting import as_text
from server.redis_client import RedisClient

logger = logging.getLogger("stealrange.server")

GENERATED_BYTES = 32


def secrets_key(prefix: str) -> str:
    """The Redis hash of generated secrets (field -> hex value)."""
    return f"{prefix}:server-secrets"


@dataclass
class ServerSecrets:
    """The secrets a running server uses; :meth:`resolve` fills in the ones not configured."""

    prefix: str
    configured: dict[str, SecretStr | None]
    _values: dict[str, bytes] = field(default_factory=dict, repr=False)

    async def resolve(self, redis: RedisClient) -> None:
        """Configured values as they are; the others read from Redis, or generated and stored there."""
        for name, value in self.configured.items():
            if value is not None:
                self._values[name] = value.get_secret_value().encode()
                continue
            key = secrets_key(self.prefix)
            created = await redis.hsetnx(key, name, secrets.token_hex(GENERATED_BYTES))
            stored = await redis.hget(key, name)
            if stored is None:  # pragma: no cover - a concurrent FLUSHALL between the two calls
                raise RuntimeError(f"the {name} stored at {key} vanished; restart the server")
            self._values[name] = as_text(stored).encode()
            if created:
                logger.warning(
                    "%s is not configured: generated a random one, stored in Redis at %s (field %s) "
                    "for every worker and replica on this Redis",
                    name,
                    key,
                    name,
                )

    def get(self, name: str) -> bytes:
        """The secret ``name``; an error if :meth:`resolve` has not run (the app's lifespan runs it)."""
        try:
            return self._values[name]
        except KeyError:
            raise RuntimeError(
                f"secret {name!r} is not resolved yet (the app's lifespan resolves it)"
            ) from None

    @property
    def server_secret(self) -> bytes:
        return self.get("server_secret")

    @property
    def key_pepper(self) -> bytes:
        return self.get("key_pepper")

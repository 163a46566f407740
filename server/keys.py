"""API keys: created by the admin, stored hashed in Redis, checked on every request.

A key reads ``sr-<key_id>-<secret>``: ``key_id`` (16 hex digits) names the Redis record and the
accounting keys, ``secret`` (32 random bytes, URL-safe base64) is never stored: only
HMAC-SHA256(pepper, secret) is. A fast keyed hash is the right tool for 256-bit random secrets (no
dictionary to slow down). Unknown ids and wrong secrets take the same path and get the same 401.

Charged requests (inference) may authenticate from a small per-worker cache of key records
(``key_cache_ttl_s``, default 1 s): a record's fields that decide what a key may ask (tier, models,
defense profile, rate, burst) never change after creation, and what does change (revocation, the
budget used) is decided again by the charge script, in Redis, on every charged request. So a
revoked key is refused from its next charged request on, in every worker; a cached record only
saves the HGETALL round trip (about a quarter of a 1-image request's loop time, measured in
docs/serving.md). Only keys found in Redis are cached: an unknown id costs its lookup every time,
as before, and cannot fill the cache. Routes that show a key's state (``/v1/usage``, the admin API)
always read Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.typing import EncodableT, FieldT

from server.accounting import Accounting, as_text
from server.errors import AuthenticationError
from server.redis_client import RedisClient
from server.secrets import ServerSecrets

KEY_PATTERN = re.compile(r"^sr-(?P<key_id>[0-9a-f]{16})-(?P<secret>[A-Za-z0-9_-]{43})$")


class KeySpec(BaseModel):
    """What an admin sets on a key. Budgets and rates count images (1 query = 1 image)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=128, description="a label for people")
    budget: int = Field(10_000, ge=-1, description="lifetime images; -1 = unlimited")
    rate: float = Field(
        0.0, ge=0, le=1e6, description="sustained images per second; 0 = no rate limit, else at least 0.001"
    )
    burst: int = Field(1024, ge=1, le=10_000_000, description="images allowed at once (GCRA tolerance)")
    tier: str = Field(
        "standard", pattern=r"^[a-z0-9_-]{1,32}$", description="output-mode tier, see model cards"
    )
    models: list[str] = Field(["*"], description="model names this key may query; '*' = all")
    defense_profile: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="a defense profile of the models' defenses.json ('profiles'): this key's pipeline "
        "wherever a model defines it, in place of its tier's",
    )

    @field_validator("rate")
    @classmethod
    def _rate_floor(cls, rate: float) -> float:
        # Below one image per 1000 s the GCRA arithmetic leaves the range of exact microseconds.
        if 0 < rate < 1e-3:
            raise ValueError("rate must be 0 (no limit) or at least 0.001 images per second")
        return rate


class KeyRecord(KeySpec):
    """A stored key as the admin API shows it (never with its secret)."""

    key_id: str
    created_at: str
    revoked: bool = False
    used: int = 0

    def allows_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class CreatedKey(BaseModel):
    """The answer to a key creation: the only time the full API key is shown."""

    api_key: str
    record: KeyRecord


class KeyStore:
    """Create, read, list, revoke and authenticate keys in Redis."""

    def __init__(
        self,
        redis: RedisClient,
        accounting: Accounting,
        secrets: ServerSecrets,
        cache_ttl_s: float = 1.0,
        cache_size: int = 10_000,
    ) -> None:
        self.redis = redis
        self.accounting = accounting
        self.secrets = secrets  # the pepper is read at use: it is resolved in the app's lifespan
        self.index = f"{accounting.prefix}:keys"
        self.cache_ttl_s = cache_ttl_s
        self.cache_size = cache_size
        # key_id -> (monotonic expiry, record, secret hash), least recently used first
        self._cache: OrderedDict[str, tuple[float, KeyRecord, str]] = OrderedDict()

    def _hash(self, secret: str) -> str:
        return hmac.new(self.secrets.key_pepper, secret.encode(), hashlib.sha256).hexdigest()

    async def create(self, spec: KeySpec) -> CreatedKey:
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = KeyRecord(
            **spec.model_dump(), key_id=key_id, created_at=datetime.now(UTC).isoformat(timespec="seconds")
        )
        fields: dict[FieldT, EncodableT] = {
            "key_id": key_id,
            "name": spec.name,
            "secret_hash": self._hash(secret),
            "budget": spec.budget,
            "used": 0,
            "rate": repr(float(spec.rate)),
            "burst": spec.burst,
            "tier": spec.tier,
            "models": json.dumps(spec.models),
            "defense_profile": spec.defense_profile or "",
            "created_at": record.created_at,
            "revoked": 0,
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.accounting.key_hash(key_id), mapping=fields)
            pipe.sadd(self.index, key_id)
            await pipe.execute()
        return CreatedKey(api_key=f"sr-{key_id}-{secret}", record=record)

    async def _load(self, key_id: str) -> tuple[KeyRecord, str] | None:
        return _parse(await self.redis.hgetall(self.accounting.key_hash(key_id)))

    async def get(self, key_id: str) -> KeyRecord | None:
        loaded = await self._load(key_id)
        return loaded[0] if loaded else None

    async def list(self) -> list[KeyRecord]:
        """Every key of the index, by id. The records are read in one pipeline: on a Redis Cluster
        they live in as many hash slots as keys, and redis-py sends each node its share at once."""
        ids = sorted(as_text(k) for k in await self.redis.smembers(self.index))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self.accounting.key_hash(key_id))
            raws = await pipe.execute()
        loaded = [_parse(raw) for raw in raws]
        return [entry[0] for entry in loaded if entry is not None]

    async def _load_cached(self, key_id: str) -> tuple[KeyRecord, str] | None:
        """``_load``, through the cache of records found in Redis (see the module's docstring)."""
        now = time.monotonic()
        entry = self._cache.get(key_id)
        if entry is not None and entry[0] > now:
            self._cache.move_to_end(key_id)
            return entry[1], entry[2]
        loaded = await self._load(key_id)
        if loaded is None or loaded[0].revoked:
            self._cache.pop(key_id, None)
            return loaded
        self._cache[key_id] = (now + self.cache_ttl_s, *loaded)
        self._cache.move_to_end(key_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return loaded

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Mark a key revoked: the charge script refuses it from the next request on (in every
        worker: the charge reads Redis); this worker's cached record goes at once, other workers'
        within ``cache_ttl_s``."""
        if not await self.redis.exists(self.accounting.key_hash(key_id)):
            return None
        await self.redis.hset(self.accounting.key_hash(key_id), "revoked", 1)
        self._cache.pop(key_id, None)
        return await self.get(key_id)

    async def authenticate(self, presented: str | None, *, cached: bool = False) -> KeyRecord:
        """The record of a valid, unrevoked key; one 401 for every other case.

        ``cached``: the record may come from the per-worker cache, up to ``cache_ttl_s`` old: only
        for requests the charge script checks again (revocation, budget) before any answer."""
        match = KEY_PATTERN.match(presented or "")
        use_cache = cached and self.cache_ttl_s > 0
        loaded = (
            (await self._load_cached(match["key_id"]) if use_cache else await self._load(match["key_id"]))
            if match
            else None
        )
        stored = loaded[1] if loaded else self._hash("0" * 43)  # the same work for unknown ids
        given = self._hash(match["secret"] if match else "x" * 43)
        valid = hmac.compare_digest(stored, given) and loaded is not None
        if not valid or loaded is None or loaded[0].revoked:
            raise AuthenticationError("invalid API key")
        return loaded[0]


def _parse(raw: Mapping[bytes | str, bytes | str]) -> tuple[KeyRecord, str] | None:
    """A stored key hash as (record, secret hash); None for a key that is not there."""
    if not raw:
        return None
    f = {as_text(k): as_text(v) for k, v in raw.items()}
    record = KeyRecord(
        key_id=f["key_id"],
        name=f.get("name", ""),
        budget=int(f["budget"]),
        rate=float(f.get("rate", "0")),
        burst=int(f.get("burst", "1")),
        tier=f.get("tier", "standard"),
        models=json.loads(f.get("models", '["*"]')),
        defense_profile=f.get("defense_profile") or None,
        created_at=f.get("created_at", ""),
        revoked=f.get("revoked") == "1",
        used=int(f.get("used", "0")),
    )
    return record, f.get("secret_hash", "")

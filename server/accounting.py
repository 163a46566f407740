"""Per-key query accounting in Redis: 1 query = 1 image, charged atomically by one Lua script.

``charge.lua`` checks the key's lifetime budget AND its GCRA rate limit (generic cell rate
algorithm, on the server's ``TIME``) and charges both or neither; ``refund.lua`` gives the images
back when inference fails after the charge. Every charge and refund appends an event to the key's
bounded audit stream. All of one key's Redis keys share the hash tag ``{key_id}``, so the scripts
run unchanged on Redis Cluster (:mod:`server.redis_client` builds the cluster client; the tests run
them on three masters). Scripts run by EVALSHA and are reloaded on NOSCRIPT (redis-py's ``Script``
object does this; on a cluster it loads the script on every master).

GCRA: with rate r images/s and burst b images, the emission interval is T = 1/r and the tolerance
tau = b*T. A request of n images is allowed when ``max(tat, now) + n*T - tau <= now``; then
``tat <- max(tat, now) + n*T``. The rate check runs before the budget check, so a rate-limited
request never reports budget exhaustion it would not have hit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources

from server.redis_client import RedisClient


class ChargeStatus(IntEnum):
    CHARGED = 0
    BUDGET_EXHAUSTED = 1
    RATE_LIMITED = 2
    BATCH_OVER_BURST = 3
    UNKNOWN_KEY = -1
    REVOKED = -2


@dataclass(frozen=True)
class ChargeResult:
    """What the charge script decided, and the numbers the rate-limit headers are made of."""

    status: ChargeStatus
    used: int
    budget: int
    rate_remaining: int  # images allowed right now; -1 when the key has no rate limit
    reset_us: int  # microseconds until the rate bucket is full again
    retry_after_us: int  # microseconds until this request would be allowed (rate limited only)
    now_us: int

    @property
    def ok(self) -> bool:
        return self.status is ChargeStatus.CHARGED

    @property
    def budget_remaining(self) -> int:
        return -1 if self.budget < 0 else max(0, self.budget - self.used)

    @property
    def retry_after_s(self) -> float:
        return self.retry_after_us / 1e6


def _script(name: str) -> str:
    return resources.files("server").joinpath("lua", name).read_text()


class Accounting:
    """Charges, refunds and reads per-key usage; one instance per app, sharing its Redis client."""

    def __init__(self, redis: RedisClient, prefix: str = "sr", audit_maxlen: int = 100_000) -> None:
        self.redis = redis
        self.prefix = prefix
        self.audit_maxlen = audit_maxlen
        self._charge = redis.register_script(_script("charge.lua"))
        self._refund = redis.register_script(_script("refund.lua"))

    def key_hash(self, key_id: str) -> str:
        """Redis hash of one API key (record + counters)."""
        return f"{self.prefix}:{{{key_id}}}:key"

    def audit_stream(self, key_id: str) -> str:
        """Redis stream of one API key's charge / refund events."""
        return f"{self.prefix}:{{{key_id}}}:audit"

    def _keys(self, key_id: str) -> list[str]:
        return [self.key_hash(key_id), self.audit_stream(key_id)]

    async def charge(
        self, key_id: str, n: int, model: str, mode: str, request_id: str, client_request_id: str = ""
    ) -> ChargeResult:
        """Charge ``n`` images to ``key_id``, or nothing; see :class:`ChargeStatus`. ``request_id`` is
        the server's id of the request; the client's own id, if any, is audited beside it."""
        if n < 1:
            raise ValueError("a charge is at least one image")
        raw = await self._charge(
            keys=self._keys(key_id),
            args=[n, model, mode, request_id, self.audit_maxlen, client_request_id],
        )
        values = [int(v) for v in raw]
        return ChargeResult(ChargeStatus(values[0]), *values[1:])

    async def refund(self, key_id: str, n: int, model: str, mode: str, request_id: str) -> int:
        """Give back ``n`` images of a failed request; returns the key's ``used`` after it."""
        raw = await self._refund(
            keys=self._keys(key_id), args=[n, model, mode, request_id, self.audit_maxlen]
        )
        return int(raw)

    async def audit_events(self, key_id: str, count: int = 1000) -> list[dict[str, str]]:
        """The most recent ``count`` audit events of a key, oldest first."""
        entries = await self.redis.xrevrange(self.audit_stream(key_id), count=count) or []
        events = []
        for entry_id, fields in reversed(entries):
            event = {as_text(k): as_text(v) for k, v in (fields or {}).items()}
            event["id"] = as_text(entry_id or b"")
            events.append(event)
        return events


def as_text(value: bytes | str) -> str:
    """Redis replies as str, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


def rate_limit_headers(result: ChargeResult, burst: int, rate: float) -> dict[str, str]:
    """IETF RateLimit headers (and the X-RateLimit-* trio clients know) plus the budget headers."""
    headers: dict[str, str] = {
        "X-Budget-Limit": str(result.budget),
        "X-Budget-Used": str(result.used),
        "X-Budget-Remaining": str(result.budget_remaining),
    }
    if rate > 0:
        remaining = str(max(0, result.rate_remaining))
        reset = str(math.ceil(result.reset_us / 1e6))
        window = max(1, math.ceil(burst / rate))
        headers.update(
            {
                "RateLimit-Policy": f"{burst};w={window}",
                "RateLimit-Limit": str(burst),
                "RateLimit-Remaining": remaining,
                "RateLimit-Reset": reset,
                "X-RateLimit-Limit": str(burst),
                "X-RateLimit-Remaining": remaining,
                "X-RateLimit-Reset": reset,
            }
        )
    return headers

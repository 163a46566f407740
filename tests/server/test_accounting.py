"""Accounting semantics on both backends: budget, GCRA rate limit, both-or-neither, refunds, audit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import fakeredis
from redis.asyncio import Redis

from server.accounting import Accounting, ChargeStatus, rate_limit_headers


def run(backend: str | None, body: Callable[[Accounting, Redis], Awaitable[Any]], **kwargs: Any) -> Any:
    """Run ``body(accounting, redis)`` on a fresh prefix of the backend under test."""

    async def main() -> Any:
        redis = (
            Redis.from_url(backend) if backend else fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        )
        try:
            return await body(Accounting(redis, prefix=f"t{uuid.uuid4().hex[:8]}", **kwargs), redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


async def add_key(
    acc: Accounting, redis: Redis, budget: int = 10, rate: float = 0.0, burst: int = 100
) -> str:
    key_id = uuid.uuid4().hex[:16]
    await redis.hset(
        acc.key_hash(key_id), mapping={"budget": budget, "used": 0, "rate": repr(rate), "burst": burst}
    )
    return key_id


def test_budget_is_all_or_nothing(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis, budget=10)
        assert (await acc.charge(key, 4, "m", "label", "r1")).used == 4
        assert (await acc.charge(key, 4, "m", "label", "r2")).used == 8
        refused = await acc.charge(key, 4, "m", "label", "r3")
        assert refused.status is ChargeStatus.BUDGET_EXHAUSTED
        assert refused.used == 8 and refused.budget_remaining == 2
        assert int(await redis.hget(acc.key_hash(key), "used")) == 8
        last = await acc.charge(key, 2, "m", "label", "r4")
        assert last.ok and last.used == 10 and last.budget_remaining == 0
        assert (await acc.charge(key, 1, "m", "label", "r5")).status is ChargeStatus.BUDGET_EXHAUSTED

    run(backend, body)


def test_unlimited_budget(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis, budget=-1)
        result = await acc.charge(key, 1000, "m", "label", "r")
        assert result.ok and result.used == 1000 and result.budget_remaining == -1

    run(backend, body)


def test_gcra_rate_limit_and_retry_after(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis, budget=-1, rate=20.0, burst=4)  # one image per 50 ms
        first = await acc.charge(key, 4, "m", "label", "r1")
        assert first.ok and first.rate_remaining == 0
        tat_before = await redis.hget(acc.key_hash(key), "tat")
        limited = await acc.charge(key, 2, "m", "label", "r2")
        assert limited.status is ChargeStatus.RATE_LIMITED
        # Two images need two emission intervals (100 ms) minus the time already elapsed.
        assert 0 < limited.retry_after_us <= 100_000
        assert await redis.hget(acc.key_hash(key), "tat") == tat_before, "a refused request moved the bucket"
        assert int(await redis.hget(acc.key_hash(key), "used")) == 4, "a refused request was charged"
        await asyncio.sleep(limited.retry_after_s + 0.01)
        assert (await acc.charge(key, 2, "m", "label", "r3")).ok

    run(backend, body)


def test_budget_refusal_does_not_consume_rate(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis, budget=3, rate=1.0, burst=10)
        assert (await acc.charge(key, 3, "m", "label", "r1")).ok
        tat = await redis.hget(acc.key_hash(key), "tat")
        assert (await acc.charge(key, 5, "m", "label", "r2")).status is ChargeStatus.BUDGET_EXHAUSTED
        assert await redis.hget(acc.key_hash(key), "tat") == tat

    run(backend, body)


def test_batch_over_burst_is_refused(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis, budget=100, rate=5.0, burst=3)
        assert (await acc.charge(key, 4, "m", "label", "r")).status is ChargeStatus.BATCH_OVER_BURST
        assert int(await redis.hget(acc.key_hash(key), "used")) == 0

    run(backend, body)


def test_unknown_and_revoked_keys(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        assert (await acc.charge("0" * 16, 1, "m", "label", "r")).status is ChargeStatus.UNKNOWN_KEY
        key = await add_key(acc, redis)
        await redis.hset(acc.key_hash(key), "revoked", 1)
        assert (await acc.charge(key, 1, "m", "label", "r")).status is ChargeStatus.REVOKED

    run(backend, body)


def test_refund_gives_back_budget_and_rate_and_is_audited(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis, budget=10, rate=1.0, burst=5)
        assert (await acc.charge(key, 5, "m", "probabilities", "req-1")).ok
        assert (await acc.charge(key, 1, "m", "probabilities", "req-2")).status is ChargeStatus.RATE_LIMITED
        assert await acc.refund(key, 5, "m", "probabilities", "req-1") == 0
        assert (await acc.charge(key, 5, "m", "probabilities", "req-3")).ok, "refund did not restore the rate"
        events = await acc.audit_events(key)
        assert [(e["event"], e["n"], e["request_id"]) for e in events] == [
            ("charge", "5", "req-1"),
            ("refund", "5", "req-1"),
            ("charge", "5", "req-3"),
        ]
        assert events[0]["model"] == "m" and events[0]["mode"] == "probabilities"
        assert int(events[0]["t_us"]) <= int(events[1]["t_us"]) <= int(events[2]["t_us"])

    run(backend, body)


def test_refund_moves_the_rate_clock_back_only_by_what_it_gives(backend: str | None) -> None:
    """A refund of more than is used gives back ``min(n, used)`` images, and only that much rate."""

    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis, budget=100, rate=1.0, burst=10)  # one image per second
        assert (await acc.charge(key, 5, "m", "label", "r1")).ok
        tat = int(await redis.hget(acc.key_hash(key), "tat"))
        await redis.hset(acc.key_hash(key), "used", 2)  # e.g. an admin credited 3 images meanwhile
        assert await acc.refund(key, 5, "m", "label", "r1") == 0
        # give = 2: the clock moves back two intervals (2 s), not five (which would reach now).
        assert int(await redis.hget(acc.key_hash(key), "tat")) == tat - 2 * 1_000_000
        assert (await acc.audit_events(key))[-1]["n"] == "2"

    run(backend, body)


def test_audit_stream_is_bounded(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> int:
        key = await add_key(acc, redis, budget=-1)
        for i in range(600):
            await acc.charge(key, 1, "m", "label", f"r{i}")
        return await redis.xlen(acc.audit_stream(key))

    length = run(backend, body, audit_maxlen=100)
    # MAXLEN ~ trims whole stream nodes (100 entries by default), so it may keep somewhat more.
    assert 100 <= length <= 300


def test_scripts_reload_after_script_flush(backend: str | None) -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis)
        assert (await acc.charge(key, 1, "m", "label", "r1")).ok
        await redis.script_flush()
        assert (await acc.charge(key, 1, "m", "label", "r2")).used == 2

    run(backend, body)


def test_keys_share_a_hash_tag() -> None:
    acc = Accounting(fakeredis.FakeAsyncRedis(), prefix="sr")
    assert acc.key_hash("abc") == "sr:{abc}:key"
    assert acc.audit_stream("abc") == "sr:{abc}:audit"


def test_rate_limit_headers() -> None:
    async def body(acc: Accounting, redis: Redis) -> None:
        key = await add_key(acc, redis, budget=50, rate=2.0, burst=8)
        result = await acc.charge(key, 3, "m", "label", "r")
        headers = rate_limit_headers(result, burst=8, rate=2.0)
        assert headers["X-Budget-Remaining"] == "47" and headers["X-Budget-Used"] == "3"
        assert headers["RateLimit-Limit"] == headers["X-RateLimit-Limit"] == "8"
        assert headers["RateLimit-Remaining"] == "5"
        assert headers["RateLimit-Reset"] == "2"  # 3 images at 2/s refill in 1.5 s
        assert headers["RateLimit-Policy"] == "8;w=4"

    run(None, body)

"""``create_app(settings)``: the victim API's FastAPI application factory.

The model store is loaded eagerly, so a bad store stops startup with a clear message before the
server binds. Redis is the one at ``settings.redis_url`` (a Redis Cluster seeded by that node with
``settings.redis_cluster``; see :mod:`server.redis_client`), or, when unset, an embedded in-process
Redis (fakeredis, with the same Lua scripts) that suits a single process: a second uvicorn worker
of the same parent on the embedded Redis refuses to start (each would count on its own). The
secrets not configured are resolved (generated once, shared through Redis) in the lifespan, before
the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import torch
from fastapi import FastAPI

from defenses.state import DefenseStore
from server import __version__
from server.accounting import Accounting
from server.errors import install_error_handlers
from server.keys import KeyStore
from server.middleware import RequestContextMiddleware
from server.redis_client import RedisClient, make_redis
from server.registry import ModelRegistry
from server.routes import admin, kserve, openai, usage
from server.secrets import ServerSecrets
from server.service import InferenceService
from server.settings import ServerSettings
from server.stats import ModelStats

logger = logging.getLogger("stealrange.server")

DESCRIPTION = """
The victim of a model-stealing range: image classifiers and encoders behind API keys and per-key
query accounting. **1 query = 1 image**: a batch of n images charges n against the key's lifetime
budget and its rate limit, atomically (one Redis Lua script), or charges nothing.

Limits: at most `max_batch` images per request, `max_body_bytes` per body (counted on the stream),
`max_image_bytes` per encoded image and `max_image_pixels` decoded pixels; inputs must match the
model's shape, UINT8 (0..255) or FP32 (within [0, 1]). Rate-limited requests get 429 with
`Retry-After`; an exhausted budget gets 429 `budget_exhausted` with `x-should-retry: false`.
Errors follow each protocol: on `/v2` (KServe v2 / Open Inference Protocol) `{"error": "<message>",
"code", "type"}`; elsewhere OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis was asked to serve more than one worker process."""


def claim_embedded_redis() -> IO[bytes] | None:
    """In a uvicorn worker process (one of ``--workers N``), hold a lock shared with its siblings:
    the embedded Redis lives inside one process, so a second worker would keep its own budgets.
    Returns the open lock file (held while the process lives), or None outside worker processes."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return None
    import fcntl

    path = Path(tempfile.gettempdir()) / f"stealrange-embedded-redis-{os.getppid()}.lock"
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise EmbeddedRedisError(
            "another worker of this server already uses the embedded Redis: several workers need a "
            "real Redis (set STEALRANGE_REDIS_URL), or each would count budgets on its own"
        ) from None
    return handle


def create_app(
    settings: ServerSettings | None = None,
    registry: ModelRegistry | None = None,
    redis: RedisClient | None = None,
) -> FastAPI:
    """Build the app: load the models, connect Redis, mount the routers and the error envelope."""
    settings = settings or ServerSettings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.gil_switch_interval_us:
        sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    embedded = redis is None and not settings.redis_url
    registry = registry or ModelRegistry.load(settings.model_store, settings.device, settings.serving_graph)
    redis = redis or make_redis(settings)
    if not settings.accounting_enabled:
        logger.warning(
            "STEALRANGE_ACCOUNTING_ENABLED=false: queries are served WITHOUT charging any budget or "
            "rate limit (benchmarks only); every answer carries x-stealrange-unmetered: true"
        )
    secrets = ServerSecrets(
        settings.redis_prefix,
        {"server_secret": settings.server_secret, "key_pepper": settings.key_pepper},
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Refused in the lifespan, not the factory: uvicorn stops the whole server on a failed
        # startup, where a failed factory would be restarted forever.
        embedded_lock = claim_embedded_redis() if embedded else None
        await secrets.resolve(redis)
        flusher = asyncio.create_task(stats.run_flusher())
        app.state.service.start()  # the long-lived inference threads (server.batching)
        yield
        await app.state.service.stop()
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        with contextlib.suppress(Exception):
            await stats.flush()
        await redis.aclose()
        if embedded_lock is not None:
            embedded_lock.close()

    otel = settings.opentelemetry
    app = FastAPI(
        # FastAPI's native OpenTelemetry looks up the global providers on every request (~5% of a
        # 1-image request's event-loop time here): on only when asked for.
        telemetry={"tracing": otel, "metrics": otel, "logs": otel},
        title="stealrange victim API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    accounting = Accounting(redis, settings.redis_prefix, settings.audit_maxlen)
    defense_store = DefenseStore(redis, settings.redis_prefix)
    stats = ModelStats(redis, settings.redis_prefix)
    app.state.settings = settings
    app.state.registry = registry
    app.state.redis = redis
    app.state.accounting = accounting
    app.state.defense_store = defense_store
    app.state.stats = stats
    app.state.keys = KeyStore(redis, accounting, secrets, settings.key_cache_ttl_s, settings.key_cache_size)
    app.state.service = InferenceService(settings, registry, accounting, defense_store, secrets, stats)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    # The inference routes first: FastAPI tries routes in order, and matching the last of ~20 cost a
    # 1-image request ~0.1 ms of event-loop time on 2 cores (docs/serving.md).
    routers = (kserve.inference_router, openai.inference_router, kserve.router, openai.router)
    for router in (*routers, usage.router, admin.router):
        app.include_router(router)
    return app

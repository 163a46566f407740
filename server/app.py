"""``create_app(settings)``: the victim API's FastAPI application factory.

The model store is loaded eagerly, so a bad store stops startup with a clear message before the
server binds. Redis is the one at ``settings.redis_url``, or, when unset, an embedded in-process
Redis (fakeredis, with the same Lua scripts) that suits a single worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import fakeredis
import torch
from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis

from defenses.state import DefenseStore
from server import __version__
from server.accounting import Accounting
from server.errors import install_error_handlers
from server.keys import KeyStore
from server.middleware import RequestContextMiddleware
from server.registry import ModelRegistry
from server.routes import admin, kserve, openai, usage
from server.settings import ServerSettings

DESCRIPTION = """
The victim of a model-stealing range: image classifiers and encoders behind API keys and per-key
query accounting. **1 query = 1 image**: a batch of n images charges n against the key's lifetime
budget and its rate limit, atomically (one Redis Lua script), or charges nothing.

Limits: at most `max_batch` images per request, `max_body_bytes` per body (counted on the stream),
`max_image_bytes` per encoded image and `max_image_pixels` decoded pixels; inputs must match the
model's shape, UINT8 (0..255) or FP32 (within [0, 1]). Rate-limited requests get 429 with
`Retry-After`; an exhausted budget gets 429 `budget_exhausted` with `x-should-retry: false`. Every
error has the body `{"error": {"type", "code", "message"}}`.
"""


def make_redis(settings: ServerSettings) -> Redis:
    """A real Redis client for ``redis_url``, else an embedded in-process one (fakeredis + Lua)."""
    if settings.redis_url:
        # A blocking pool makes a burst of requests wait for a free connection instead of failing.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections, timeout=settings.redis_timeout
        )
        return Redis(connection_pool=pool)
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


def create_app(
    settings: ServerSettings | None = None, registry: ModelRegistry | None = None, redis: Redis | None = None
) -> FastAPI:
    """Build the app: load the models, connect Redis, mount the routers and the error envelope."""
    settings = settings or ServerSettings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    registry = registry or ModelRegistry.load(settings.model_store, settings.device)
    redis = redis or make_redis(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await redis.aclose()

    app = FastAPI(
        title="stealrange victim API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.redis = redis
    app.state.accounting = Accounting(redis, settings.redis_prefix, settings.audit_maxlen)
    app.state.defense_store = DefenseStore(redis, settings.redis_prefix)
    app.state.keys = KeyStore(redis, app.state.accounting, settings.key_pepper.get_secret_value())
    app.state.inference_limiter = anyio.CapacityLimiter(settings.inference_threads)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    for router in (kserve.router, openai.router, usage.router, admin.router):
        app.include_router(router)
    return app

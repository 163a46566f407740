"""Per-model inference statistics in Redis, as Triton's statistics extension reports them.

``GET /v2/models/{name}/stats`` and ``GET /v2/models/stats`` answer Triton's shape::

    {"model_stats": [{"name", "version", "last_inference", "inference_count", "execution_count",
                      "inference_stats": {"success", "fail", "queue", "compute_input",
                                          "compute_infer", "compute_output",
                                          "cache_hit", "cache_miss"}: {"count", "ns"},
                      "batch_stats": []}]}

``inference_count`` counts images (1 query = 1 image), ``execution_count`` forward passes;
``success`` and ``fail`` count requests and their cumulative wall time from the charge to the
outputs; ``queue`` is the time a request waited for an inference thread, ``compute_input`` the
time spent turning its decoded images into the model's input, ``compute_infer`` the forward pass
and ``compute_output`` the defenses and the output tensors. Counters live in one Redis hash per
model (``<prefix>:stats:<model>``), so every worker and replica adds to the same figures; one
pipelined round trip per request writes them. There is no response cache: ``cache_*`` stay 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from server.accounting import as_text

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class RequestTimes:
    """What one request spent in each phase (nanoseconds); filled in along the request path."""

    started_ns: int = field(default_factory=time.perf_counter_ns)
    images: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    executions: int = 0

    def elapsed_ns(self) -> int:
        return time.perf_counter_ns() - self.started_ns


class ModelStats:
    """Adds one request's times to its model's counters and reads them back in Triton's shape."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, model: str) -> str:
        return f"{self.prefix}:stats:{model}"

    async def record(self, model: str, times: RequestTimes, ok: bool) -> None:
        """Add a finished request (``ok``) or a failed one after its charge."""
        outcome = "success" if ok else "fail"
        key = self.key(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, f"{outcome}_count", 1)
            pipe.hincrby(key, f"{outcome}_ns", times.elapsed_ns())
            if ok:
                pipe.hincrby(key, "inference_count", times.images)
                pipe.hincrby(key, "execution_count", times.executions)
                for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
                    pipe.hincrby(key, f"{phase}_count", 1)
                    pipe.hincrby(key, f"{phase}_ns", getattr(times, f"{phase}_ns"))
                pipe.hset(key, "last_inference", int(time.time() * 1000))
            await pipe.execute()

    async def read(self, model: str, version: str) -> dict[str, Any]:
        """One model's entry of Triton's ``model_stats`` list."""
        raw = {as_text(k): int(as_text(v)) for k, v in (await self.redis.hgetall(self.key(model))).items()}
        return {
            "name": model,
            "version": version,
            "last_inference": raw.get("last_inference", 0),
            "inference_count": raw.get("inference_count", 0),
            "execution_count": raw.get("execution_count", 0),
            "inference_stats": {
                **{
                    phase: {"count": raw.get(f"{phase}_count", 0), "ns": raw.get(f"{phase}_ns", 0)}
                    for phase in PHASES
                },
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [],
        }

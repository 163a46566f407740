"""Per-model inference statistics in Redis, as Triton's statistics extension reports them.

``GET /v2/models/{name}/stats`` and ``GET /v2/models/stats`` answer Triton's shape::

    {"model_stats": [{"name", "version", "last_inference", "inference_count", "execution_count",
                      "inference_stats": {"success", "fail", "queue", "compute_input",
                                          "compute_infer", "compute_output",
                                          "cache_hit", "cache_miss"}: {"count", "ns"},
                      "batch_stats": [{"batch_size", "compute_input", "compute_infer",
                                       "compute_output"}: {"count", "ns"}]}]}

``inference_count`` counts images (1 query = 1 image), ``execution_count`` forward passes: with
dynamic batching (:mod:`server.batching`) one forward serves several requests, so
``inference_count / execution_count`` is the mean batch, and ``batch_stats`` has one entry per
batch size run (``{"batch_size", "compute_input", "compute_infer", "compute_output"}``, each
``{"count", "ns"}`` per forward, as Triton reports them). ``success`` and ``fail`` count requests
and their cumulative wall time from the charge to the outputs; ``queue`` is the time a request
waited for its forward to start, ``compute_input`` the time spent turning its forward's decoded
images into the model's input, ``compute_infer`` its forward pass (the whole batch's, as Triton
counts it) and ``compute_output`` its own defenses and output tensors. Counters live in one Redis hash per
model (``<prefix>:stats:<model>``), so every worker and replica adds to the same figures. A request
adds its times to the worker's in-memory tally (no Redis round trip on the request path); the tally
is flushed to Redis by one pipelined round trip every :data:`FLUSH_SECONDS`, when the statistics are
read through this worker, and at shutdown, so another worker's last second may lag. There is no
response cache: ``cache_*`` stay 0.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from server.accounting import as_text
from server.redis_client import RedisClient

logger = logging.getLogger("stealrange.server")

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_PHASES = ("compute_input", "compute_infer", "compute_output")
BATCH_FIELD = "batch:"  # hash fields "batch:<size>:<phase>_count" / "_ns" hold batch_stats


@dataclass
class RequestTimes:
    """What one request spent in each phase (nanoseconds); filled in along the request path."""

    started_ns: int = field(default_factory=time.perf_counter_ns)
    images: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0

    def elapsed_ns(self) -> int:
        return time.perf_counter_ns() - self.started_ns


FLUSH_SECONDS = 1.0


class ModelStats:
    """Adds one request's times to its model's counters and reads them back in Triton's shape.

    The tally is written by the event loop (requests) and the inference threads (forwards), so a
    lock guards it: held for a few dictionary updates, never across a Redis round trip."""

    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._pending: dict[str, Counter[str]] = defaultdict(Counter)
        self._last_inference: dict[str, int] = {}
        self._lock = threading.Lock()

    def key(self, model: str) -> str:
        return f"{self.prefix}:stats:{model}"

    def record(self, model: str, times: RequestTimes, ok: bool) -> None:
        """Add a finished request (``ok``) or a failed one after its charge to the worker's tally."""
        outcome = "success" if ok else "fail"
        elapsed = times.elapsed_ns()
        with self._lock:
            tally = self._pending[model]
            tally[f"{outcome}_count"] += 1
            tally[f"{outcome}_ns"] += elapsed
            if ok:
                tally["inference_count"] += times.images
                for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
                    tally[f"{phase}_count"] += 1
                    tally[f"{phase}_ns"] += getattr(times, f"{phase}_ns")
                self._last_inference[model] = int(time.time() * 1000)

    def record_batch(self, model: str, size: int, input_ns: int, infer_ns: int) -> None:
        """Add one forward of ``size`` images (one execution, whatever number of requests it served)."""
        with self._lock:
            tally = self._pending[model]
            tally["execution_count"] += 1
            for phase, ns in (("compute_input", input_ns), ("compute_infer", infer_ns)):
                tally[f"{BATCH_FIELD}{size}:{phase}_count"] += 1
                tally[f"{BATCH_FIELD}{size}:{phase}_ns"] += ns

    def record_batch_output(self, model: str, size: int, output_ns: int) -> None:
        """Add the time a forward of ``size`` images spent on its requests' own outputs."""
        with self._lock:
            tally = self._pending[model]
            tally[f"{BATCH_FIELD}{size}:compute_output_count"] += 1
            tally[f"{BATCH_FIELD}{size}:compute_output_ns"] += output_ns

    async def flush(self) -> None:
        """Add the worker's tally to the counters in Redis (one pipelined round trip) and clear it."""
        with self._lock:
            if not self._pending:
                return
            pending, last = self._pending, self._last_inference
            self._pending, self._last_inference = defaultdict(Counter), {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for model, tally in pending.items():
                for name, value in tally.items():
                    pipe.hincrby(self.key(model), name, value)
            for model, at in last.items():
                pipe.hset(self.key(model), "last_inference", at)
            await pipe.execute()

    async def run_flusher(self) -> None:
        """Flush every :data:`FLUSH_SECONDS` until cancelled (the app's lifespan runs it)."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception:  # Redis unavailable: the next flush tries again with a fresh tally
                logger.warning("could not write inference statistics to Redis", exc_info=True)

    async def read(self, model: str, version: str) -> dict[str, Any]:
        """One model's entry of Triton's ``model_stats`` list (this worker's tally flushed first)."""
        await self.flush()
        raw = {as_text(k): int(as_text(v)) for k, v in (await self.redis.hgetall(self.key(model))).items()}
        sizes = sorted({int(k.split(":")[1]) for k in raw if k.startswith(BATCH_FIELD)})
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
            "batch_stats": [
                {
                    "batch_size": size,
                    **{
                        phase: {
                            "count": raw.get(f"{BATCH_FIELD}{size}:{phase}_count", 0),
                            "ns": raw.get(f"{BATCH_FIELD}{size}:{phase}_ns", 0),
                        }
                        for phase in BATCH_PHASES
                    },
                }
                for size in sizes
            ],
        }

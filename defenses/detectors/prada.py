"""PRADA (Juuti, Szyller, Marchal & Asokan, "PRADA: Protecting Against DNN Model Stealing Attacks",
EuroS&P 2019): a stateful detector of extraction query streams.

Honest queries are natural samples: the distance from a new query to the closest earlier one is
roughly normally distributed. Extraction queries (synthetic, augmented or perturbed variants of a
few seeds) are not. Per key, PRADA keeps, for every class ``c`` the model predicts, a growing set
``G_c`` of queries and a threshold ``T_c``; for a query ``x`` of class ``c`` (Algorithm 1):

    d_min = min_{y in G_c} ||x - y||_2         (nothing for the first query of a class)
    D <- D + [d_min]
    if d_min > T_c:  G_c <- G_c + [x];  D_c <- D_c + [d_min];  T_c <- max(T_c, mean(D_c) - std(D_c))
    once |D| > min_distances:  attack if  W(D) < delta   (Shapiro-Wilk statistic)

Distances are between input images in ``[0, 1]`` pixel space, as in the paper. Encoders have no
classes: one growing set. Defaults: ``delta`` = 0.95, ``min_distances`` = 100 (the paper tunes
delta per victim; calibrate it on honest traffic with the range), ``window`` = 5000 (W over the most
recent distances: the Shapiro-Wilk approximation is valid up to 5000 samples).

State lives in Redis (per key and model: the growing sets as lists of uint8 images, the distances,
thresholds and running sums, and the flag), and one request's read-update-write runs under a
per-key lock, so two workers see one sequence of queries. Each worker caches the growing sets it has
read and fetches only what other workers appended since. On detection the key is flagged in its
usage (``GET /v1/usage``, the admin API and the audit stream) and, by ``action``, from then on
refused with 403 ``extraction_suspected`` or served through the ``defend_with`` pipeline.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy import stats

from defenses.base import DefenseParams, DefensePipeline, ModelKind
from defenses.state import DefenseStore

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

FLAG = "extraction_suspected"


class PRADAParams(DefenseParams):
    delta: float = Field(0.95, gt=0, lt=1, description="Shapiro-Wilk threshold: W < delta flags the key")
    min_distances: int = Field(100, ge=3, description="distances needed before testing")
    window: int = Field(5000, ge=3, le=5000, description="most recent distances the test looks at")
    action: Literal["flag", "refuse", "defend"] = Field(
        "flag", description="on detection: only flag, refuse with 403, or serve through defend_with"
    )
    defend_with: list[dict[str, Any]] = Field(
        default_factory=list, description="pipeline for flagged keys (action=defend)"
    )
    lock_timeout_s: float = Field(30.0, gt=0, description="per-key lock expiry")

    @model_validator(mode="after")
    def _defend(self) -> PRADAParams:
        if self.action == "defend" and not self.defend_with:
            raise ValueError("action 'defend' needs a defend_with pipeline")
        return self


@dataclass(frozen=True)
class Detection:
    """The detector's state for one key after a request."""

    distances: int
    w: float | None
    flagged: bool
    newly_flagged: bool


def shapiro_w(distances: np.ndarray) -> float:
    """The Shapiro-Wilk statistic W (1 for a perfectly normal sample); 1.0 for a constant sample."""
    if np.ptp(distances) == 0:
        return 1.0
    return float(stats.shapiro(distances).statistic)


def prada_reference(
    images: torch.Tensor, classes: list[int]
) -> tuple[list[float], dict[int, list[int]], dict[int, float]]:
    """Algorithm 1, literally, one query at a time: (D, growing sets as indices, thresholds)."""
    flat = images.reshape(len(images), -1).double()
    distances: list[float] = []
    growing: dict[int, list[int]] = {}
    added: dict[int, list[float]] = {}
    threshold: dict[int, float] = {}
    for i, c in enumerate(classes):
        if c not in growing:
            growing[c], added[c], threshold[c] = [i], [], 0.0
            continue
        d_min = min(float((flat[i] - flat[j]).norm()) for j in growing[c])
        distances.append(d_min)
        if d_min > threshold[c]:
            growing[c].append(i)
            added[c].append(d_min)
            threshold[c] = max(threshold[c], float(np.mean(added[c]) - np.std(added[c])))
    return distances, growing, threshold


class PRADA:
    """The detector: parameters checked at construction, state in a :class:`DefenseStore`."""

    name = "prada"
    paper = "Juuti et al., PRADA, EuroS&P 2019"
    Params = PRADAParams
    CACHED_SETS = 256  # (key, model, class) growing sets a worker keeps in memory

    def __init__(self, params: PRADAParams | dict[str, Any] | None = None, **overrides: Any) -> None:
        base = params.model_dump() if isinstance(params, PRADAParams) else dict(params or {})
        self.params = PRADAParams.model_validate({**base, **overrides})
        self.fallback: DefensePipeline | None = None
        self._sets: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __repr__(self) -> str:
        return f"prada(delta={self.params.delta}, action={self.params.action!r})"

    def check(self, kind: ModelKind) -> None:
        """Build the ``defend_with`` pipeline for this kind of model (a bad spec stops startup)."""
        if self.params.action == "defend":
            self.fallback = DefensePipeline.from_specs(self.params.defend_with, kind)

    # Redis keys of one (API key, model).
    def _key(self, store: DefenseStore, key_id: str, model: str, *parts: str) -> str:
        return store.key(key_id, "prada", model, *parts)

    async def flag_of(self, store: DefenseStore, key_id: str, model: str) -> dict[str, Any] | None:
        raw = await store.redis.hget(store.flags_key(key_id), model)
        return None if raw is None else json.loads(raw)

    async def _lock(self, store: DefenseStore, key_id: str, model: str) -> tuple[str, str]:
        name, token = self._key(store, key_id, model, "lock"), secrets.token_hex(8)
        timeout_ms = int(self.params.lock_timeout_s * 1000)
        delay = 0.001
        while not await store.redis.set(name, token, nx=True, px=timeout_ms):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return name, token

    async def _growing_set(
        self, store: DefenseStore, key_id: str, model: str, c: int, dim: int
    ) -> torch.Tensor:
        """Class ``c``'s growing set ``[m, dim]`` in [0, 1]: the cached rows plus what others appended."""
        name = self._key(store, key_id, model, "g", str(c))
        cached = self._sets.pop(name, torch.empty(0, dim))
        new = await store.redis.lrange(name, len(cached), -1)
        if new:
            rows = np.frombuffer(b"".join(new), dtype=np.uint8).reshape(len(new), dim)
            cached = torch.cat([cached, torch.from_numpy(rows.astype(np.float32) / 255.0)])
        self._sets[name] = cached
        while len(self._sets) > self.CACHED_SETS:
            self._sets.popitem(last=False)
        return cached

    async def observe(
        self, store: DefenseStore, key_id: str, model: str, inputs: torch.Tensor, classes: list[int]
    ) -> Detection:
        """Run Algorithm 1 over one request's images (in batch order) and test; flag on detection."""
        p = self.params
        quantised = (inputs.detach().float().cpu().reshape(len(inputs), -1).clamp(0, 1) * 255).round()
        flat = quantised / 255.0  # distances on what is stored, so every worker computes the same
        dim = flat.shape[1]
        lock, token = await self._lock(store, key_id, model)
        try:
            stats_key = self._key(store, key_id, model, "stats")
            raw_stats = await store.redis.hgetall(stats_key)
            state = {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw_stats.items()}
            sets = {c: await self._growing_set(store, key_id, model, c, dim) for c in sorted(set(classes))}
            new_rows: dict[int, list[int]] = {c: [] for c in sets}
            distances: list[float] = []
            for i, c in enumerate(classes):
                members = torch.cat([sets[c], flat[new_rows[c]]]) if new_rows[c] else sets[c]
                if len(members) == 0:
                    new_rows[c].append(i)
                    continue
                d_min = float(torch.cdist(flat[i : i + 1].double(), members.double()).min())
                distances.append(d_min)
                if d_min > state.get(f"t:{c}", 0.0):
                    new_rows[c].append(i)
                    n = state.get(f"n:{c}", 0.0) + 1
                    s = state.get(f"s:{c}", 0.0) + d_min
                    ss = state.get(f"ss:{c}", 0.0) + d_min * d_min
                    mean = s / n
                    std = math.sqrt(max(0.0, ss / n - mean * mean))
                    state.update({f"n:{c}": n, f"s:{c}": s, f"ss:{c}": ss})
                    state[f"t:{c}"] = max(state.get(f"t:{c}", 0.0), mean - std)
            distances_key = self._key(store, key_id, model, "d")
            async with store.redis.pipeline(transaction=True) as pipe:
                for c, rows in new_rows.items():
                    if rows:
                        pipe.rpush(
                            self._key(store, key_id, model, "g", str(c)),
                            *[quantised[i].to(torch.uint8).numpy().tobytes() for i in rows],
                        )
                if distances:
                    pipe.rpush(distances_key, *[repr(d) for d in distances])
                if state:
                    pipe.hset(stats_key, mapping={k: repr(v) for k, v in state.items()})
                pipe.llen(distances_key)
                pipe.lrange(distances_key, -p.window, -1)
                results = await pipe.execute()
            total, recent = int(results[-2]), results[-1]
            # The cached sets now include this request's additions (read back next time by length).
            for c, rows in new_rows.items():
                name = self._key(store, key_id, model, "g", str(c))
                if rows and name in self._sets:
                    self._sets[name] = torch.cat([self._sets[name], flat[rows]])
            w = None
            if total > p.min_distances:
                w = shapiro_w(np.array([float(v) for v in recent]))
            flag = await self.flag_of(store, key_id, model)
            newly = False
            if flag is None and w is not None and w < p.delta:
                record = {
                    "flag": FLAG,
                    "detector": self.name,
                    "w": w,
                    "delta": p.delta,
                    "distances": total,
                    "at": time.time(),
                    "action": p.action,
                }
                newly = bool(await store.redis.hsetnx(store.flags_key(key_id), model, json.dumps(record)))
                flag = record
            return Detection(distances=total, w=w, flagged=flag is not None, newly_flagged=newly)
        finally:
            await store.run("prada_unlock", RELEASE_LOCK, [lock], [token])

    async def state(self, store: DefenseStore, key_id: str, model: str) -> dict[str, Any]:
        """What the admin API shows: distances seen, the latest W, growing-set sizes, the flag."""
        distances_key = self._key(store, key_id, model, "d")
        total = int(await store.redis.llen(distances_key))
        recent = await store.redis.lrange(distances_key, -self.params.window, -1)
        w = shapiro_w(np.array([float(v) for v in recent])) if total > self.params.min_distances else None
        return {
            "distances": total,
            "w": w,
            "delta": self.params.delta,
            "flag": await self.flag_of(store, key_id, model),
        }

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
recent distances: the Shapiro-Wilk approximation is valid up to 5000 samples), ``max_set_size`` =
5000 members per growing set.

State is bounded: Redis keeps only the last ``window`` distances (their total count apart) and the
last ``max_set_size`` members of each ``G_c``. Evicting a growing set's oldest member is a departure
from Algorithm 1, whose sets grow forever; it only matters once a class has more than
``max_set_size`` members, and ``T_c`` stays exact (its running sums over ``D_c`` are kept whole).

State lives in Redis (per key and model: the growing sets as lists of uint8 images, the distances,
thresholds and running sums, counters of what was ever appended, and the flag), and one request's
read-update-write runs under a per-key lock, so two workers see one sequence of queries. Every one
of these keys, the lock included, carries the API key's hash tag: on a Redis Cluster they share one
hash slot, so the lock, the transactions and the pipelines below each go to one node. The
distances and the test run in a worker thread, never on the event loop. Each worker caches the
growing sets it has read (as uint8, least recently used first out past ``PRADA.CACHE_BYTES``, 256
MiB) and fetches only what others appended since; a cached set is tagged with the Redis counter of
its appends and dropped when the counter disagrees, or when the worker's lock expired during its
update (so a worker whose lock ran out never reuses a set out of step with Redis). On detection the
key is flagged in its usage (``GET /v1/usage``, the admin API and the audit stream) and, by
``action``, from then on refused with 403 ``extraction_suspected`` or served through the
``defend_with`` pipeline.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import torch
from pydantic import Field
from scipy import stats

from defenses.detectors.base import DETECTORS, Detection, Detector, DetectorParams
from defenses.state import DefenseStore

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class PRADAParams(DetectorParams):
    delta: float = Field(0.95, gt=0, lt=1, description="Shapiro-Wilk threshold: W < delta flags the key")
    min_distances: int = Field(100, ge=3, description="distances needed before testing")
    window: int = Field(5000, ge=3, le=5000, description="most recent distances kept and tested")
    max_set_size: int = Field(
        5000, ge=1, description="members kept per growing set G_c (the oldest evicted past it)"
    )
    lock_timeout_s: float = Field(30.0, gt=0, description="per-key lock expiry")


def shapiro_w(distances: np.ndarray) -> float:
    """The Shapiro-Wilk statistic W (1 for a perfectly normal sample); 1.0 for a constant sample."""
    if np.ptp(distances) == 0:
        return 1.0
    return float(stats.shapiro(distances).statistic)


def prada_reference(
    images: torch.Tensor, classes: list[int], max_set_size: int | None = None
) -> tuple[list[float], dict[int, list[int]], dict[int, float]]:
    """Algorithm 1, literally, one query at a time: (D, growing sets as indices, thresholds).

    ``max_set_size`` evicts a growing set's oldest member past that size, as :class:`PRADA` does.
    """
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
            if max_set_size is not None and len(growing[c]) > max_set_size:
                growing[c].pop(0)
            added[c].append(d_min)
            threshold[c] = max(threshold[c], float(np.mean(added[c]) - np.std(added[c])))
    return distances, growing, threshold


def prada_step(
    x: torch.Tensor,
    classes: list[int],
    sets: dict[int, torch.Tensor],
    state: dict[str, float],
    max_set_size: int,
) -> tuple[dict[int, list[int]], list[float]]:
    """Algorithm 1 over one request (CPU work, run in a worker thread); updates ``state`` in place.

    ``x`` is ``[n, dim]`` float64 in [0, 1], ``sets[c]`` class ``c``'s growing set as read (float64);
    returns the indices of ``x`` added to each set, in order, and the distances.
    """
    new_rows: dict[int, list[int]] = {c: [] for c in sets}
    distances: list[float] = []
    for i, c in enumerate(classes):
        base, added = sets[c], new_rows[c]
        drop = max(0, len(base) + len(added) - max_set_size)  # G_c = (base + added)[drop:]
        parts = [base[drop:]] if drop < len(base) else []
        kept = added[max(0, drop - len(base)) :]
        if kept:
            parts.append(x[kept])
        if not parts:
            added.append(i)
            continue
        # Direct differences, not the |x|^2 + |y|^2 - 2xy expansion: exact 0 for a repeated image.
        d_min = min(
            float(torch.cdist(x[i : i + 1], part, compute_mode="donot_use_mm_for_euclid_dist").min())
            for part in parts
        )
        distances.append(d_min)
        if d_min > state.get(f"t:{c}", 0.0):
            added.append(i)
            n = state.get(f"n:{c}", 0.0) + 1
            s = state.get(f"s:{c}", 0.0) + d_min
            ss = state.get(f"ss:{c}", 0.0) + d_min * d_min
            mean = s / n
            std = math.sqrt(max(0.0, ss / n - mean * mean))
            state.update({f"n:{c}": n, f"s:{c}": s, f"ss:{c}": ss})
            state[f"t:{c}"] = max(state.get(f"t:{c}", 0.0), mean - std)
    return new_rows, distances


@dataclass
class CachedSet:
    """A worker's copy of one growing set, as Redis held it when ``count`` rows had been appended."""

    epoch: str  # the Redis state's identity: a reset state starts a new epoch
    count: int  # rows ever appended to the set (the Redis counter)
    rows: torch.Tensor  # uint8 [m, dim]: its last min(count, max_set_size) members

    @property
    def nbytes(self) -> int:
        return self.rows.nelement()


def _as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def quantise(inputs: torch.Tensor) -> torch.Tensor:
    """Images as stored, ``[n, dim]`` uint8: distances are computed on these, so workers agree."""
    return (inputs.detach().float().cpu().reshape(len(inputs), -1).clamp(0, 1) * 255).round().to(torch.uint8)


def _join_rows(cached: torch.Tensor | None, new: list[bytes], dim: int) -> torch.Tensor:
    """Cached uint8 rows followed by rows read from Redis (raw bytes), ``[m, dim]`` uint8."""
    rows = torch.empty(0, dim, dtype=torch.uint8) if cached is None else cached
    if not new:
        return rows
    decoded = torch.from_numpy(np.frombuffer(b"".join(new), dtype=np.uint8).reshape(len(new), dim).copy())
    return torch.cat([rows, decoded])


def _append_rows(rows: torch.Tensor, new: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.cat([rows, new])[-keep:]


@DETECTORS.register
class PRADA(Detector):
    """The detector: parameters checked at construction, state in a :class:`DefenseStore`."""

    name = "prada"
    paper = "Juuti et al., PRADA, EuroS&P 2019"
    Params = PRADAParams
    params: PRADAParams
    CACHE_BYTES = 256 * 2**20  # growing sets a worker keeps in memory (uint8 rows), in all

    def __init__(self, params: PRADAParams | dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(params, **overrides)
        self._sets: OrderedDict[str, CachedSet] = OrderedDict()
        self._cached_bytes = 0

    def __repr__(self) -> str:
        return f"prada(delta={self.params.delta}, action={self.params.action!r})"

    # Redis keys of one (API key, model).
    def _key(self, store: DefenseStore, key_id: str, model: str, *parts: str) -> str:
        return store.key(key_id, "prada", model, *parts)

    async def _lock(self, store: DefenseStore, key_id: str, model: str) -> tuple[str, str]:
        name, token = self._key(store, key_id, model, "lock"), secrets.token_hex(8)
        timeout_ms = int(self.params.lock_timeout_s * 1000)
        delay = 0.001
        while not await store.redis.set(name, token, nx=True, px=timeout_ms):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return name, token

    # The worker's cache of growing sets (touched on the event loop only).
    @property
    def cached_bytes(self) -> int:
        """Bytes held by this worker's cache of growing sets."""
        return self._cached_bytes

    def _cache_drop(self, name: str) -> None:
        entry = self._sets.pop(name, None)
        if entry is not None:
            self._cached_bytes -= entry.nbytes

    def _cache_put(self, name: str, entry: CachedSet) -> None:
        self._cache_drop(name)
        if entry.nbytes > self.CACHE_BYTES:
            return
        self._sets[name] = entry
        self._cached_bytes += entry.nbytes
        while self._cached_bytes > self.CACHE_BYTES:
            _, old = self._sets.popitem(last=False)
            self._cached_bytes -= old.nbytes

    def forget(self, store: DefenseStore, key_id: str, model: str) -> None:
        """Drop this worker's cached growing sets of one (key, model)."""
        prefix = self._key(store, key_id, model, "g") + ":"
        for name in [name for name in self._sets if name.startswith(prefix)]:
            self._cache_drop(name)

    async def _read_set(
        self, store: DefenseStore, counts_key: str, name: str, c: int, epoch: str, count: int | None, dim: int
    ) -> tuple[torch.Tensor | None, list[bytes], int]:
        """Class ``c``'s set as (cached uint8 rows or None, raw rows read after them, appends counted).

        The cache serves only if it is of this epoch and at most ``count`` appends old: then only the
        rows appended since are read. Otherwise the whole list is read. Each read takes the list and
        its counter in one transaction, so what is cached always matches the counter it is tagged
        with. ``count`` None (state written before the counters existed, whose lists were never
        trimmed) counts the list.
        """
        cached = self._sets.get(name)
        if cached is not None:
            self._sets.move_to_end(name)
            if (
                count is None
                or cached.epoch != epoch
                or count < cached.count
                or cached.rows.shape[1] != dim
                or count - cached.count > self.params.max_set_size
            ):
                self._cache_drop(name)
                cached = None
        if cached is not None and count == cached.count:
            return cached.rows, [], count
        field = f"g:{c}"
        if cached is not None and count is not None:
            missing = count - cached.count
            async with store.redis.pipeline(transaction=True) as pipe:
                pipe.hmget(counts_key, ["epoch", field])
                pipe.lrange(name, -missing, -1)
                (now_epoch, now_count), new = await pipe.execute()
            unchanged = now_epoch is not None and _as_text(now_epoch) == epoch and now_count is not None
            if unchanged and int(now_count) == count and len(new) == missing:
                return cached.rows, new, count
            self._cache_drop(name)
        async with store.redis.pipeline(transaction=True) as pipe:
            pipe.hget(counts_key, field)
            pipe.lrange(name, 0, -1)
            now_count, rows = await pipe.execute()
        return None, rows, len(rows) if now_count is None else int(now_count)

    async def observe(
        self, store: DefenseStore, key_id: str, model: str, inputs: torch.Tensor, classes: list[int]
    ) -> Detection:
        """Run Algorithm 1 over one request's images (in batch order) and test; flag on detection."""
        quantised = await anyio.to_thread.run_sync(quantise, inputs)
        lock, token = await self._lock(store, key_id, model)
        try:
            return await self._observe_locked(store, key_id, model, quantised, classes)
        finally:
            if not await store.run("prada_unlock", RELEASE_LOCK, [lock], [token]):
                # The lock expired during the update (and may be another worker's now): what this
                # worker cached may be out of step with Redis. Forget it; the next request re-reads.
                self.forget(store, key_id, model)

    async def _observe_locked(
        self, store: DefenseStore, key_id: str, model: str, quantised: torch.Tensor, classes: list[int]
    ) -> Detection:
        p = self.params
        dim = quantised.shape[1]
        stats_key = self._key(store, key_id, model, "stats")
        counts_key = self._key(store, key_id, model, "count")
        distances_key = self._key(store, key_id, model, "d")
        async with store.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(stats_key)
            pipe.hgetall(counts_key)
            raw_stats, raw_counts = await pipe.execute()
        state = {_as_text(k): float(v) for k, v in raw_stats.items()}
        counts = {_as_text(k): _as_text(v) for k, v in raw_counts.items()}
        epoch = counts.get("epoch")
        if epoch is None:  # a new state (or one written before the counters): give it an identity
            await store.redis.hsetnx(counts_key, "epoch", secrets.token_hex(8))
            epoch = _as_text(await store.redis.hget(counts_key, "epoch") or b"")
        names = {c: self._key(store, key_id, model, "g", str(c)) for c in sorted(set(classes))}
        read: dict[int, tuple[torch.Tensor | None, list[bytes], int]] = {}
        for c, name in names.items():
            counted = counts.get(f"g:{c}")
            read[c] = await self._read_set(
                store, counts_key, name, c, epoch, None if counted is None else int(counted), dim
            )
        legacy_total = None
        if "d" not in counts:
            legacy_total = int(await store.redis.llen(distances_key))

        def compute() -> tuple[
            dict[int, torch.Tensor], dict[int, list[int]], list[float], dict[int, list[bytes]]
        ]:
            sets = {
                c: _join_rows(cached, new, dim)[-p.max_set_size :] for c, (cached, new, _) in read.items()
            }
            x = (quantised.float() / 255.0).double()  # what is stored, so every worker computes the same
            as_float = {c: (rows.float() / 255.0).double() for c, rows in sets.items()}
            new_rows, distances = prada_step(x, classes, as_float, state, p.max_set_size)
            payload = {
                c: [quantised[i].numpy().tobytes() for i in rows[-p.max_set_size :]]
                for c, rows in new_rows.items()
            }
            return sets, new_rows, distances, payload

        sets, new_rows, distances, payload = await anyio.to_thread.run_sync(compute)
        for c, held in sets.items():  # the sets as Redis holds them now
            self._cache_put(names[c], CachedSet(epoch, read[c][2], held))

        at: dict[str, int] = {}  # where the replies we need are in the transaction's results
        async with store.redis.pipeline(transaction=True) as pipe:
            for c, (_, _, count) in read.items():
                if f"g:{c}" not in counts:  # the counter starts from what the list holds
                    pipe.hsetnx(counts_key, f"g:{c}", count)
            if legacy_total is not None:
                pipe.hsetnx(counts_key, "d", legacy_total)
            for c, rows in new_rows.items():
                if rows:
                    pipe.rpush(names[c], *payload[c])
                    pipe.ltrim(names[c], -p.max_set_size, -1)
                    at[f"g:{c}"] = len(pipe)
                    pipe.hincrby(counts_key, f"g:{c}", len(rows))
            if distances:
                pipe.rpush(distances_key, *[repr(d) for d in distances])
                pipe.ltrim(distances_key, -p.window, -1)
            at["d"] = len(pipe)
            pipe.hincrby(counts_key, "d", len(distances))
            if state:
                pipe.hset(stats_key, mapping={k: repr(v) for k, v in state.items()})
            at["recent"] = len(pipe)
            pipe.lrange(distances_key, -p.window, -1)
            results = await pipe.execute()
        total, recent = int(results[at["d"]]), results[at["recent"]]
        # A cached set takes this request's additions if Redis counted exactly those since the read;
        # otherwise another worker wrote in between (this worker's lock ran out): forget the set.
        for c, rows in new_rows.items():
            if not rows:
                continue
            entry, count = self._sets.get(names[c]), int(results[at[f"g:{c}"]])
            if entry is not None and count == read[c][2] + len(rows):
                grown = await anyio.to_thread.run_sync(
                    _append_rows, entry.rows, quantised[rows], p.max_set_size
                )
                self._cache_put(names[c], CachedSet(epoch, count, grown))
            else:
                self._cache_drop(names[c])
        w = None
        if total > p.min_distances:
            w = await anyio.to_thread.run_sync(shapiro_w, np.array([float(v) for v in recent]))
        flag = await self.flag_of(store, key_id, model)
        newly = False
        if flag is None and w is not None and w < p.delta:
            flag, newly = await self.raise_flag(
                store, key_id, model, {"w": w, "delta": p.delta, "distances": total}
            )
        return Detection(distances=total, w=w, flagged=flag is not None, newly_flagged=newly)

    async def state(self, store: DefenseStore, key_id: str, model: str) -> dict[str, Any]:
        """What the admin API shows: distances seen (all counted), W over the window, delta, the flag."""
        distances_key = self._key(store, key_id, model, "d")
        counted = await store.redis.hget(self._key(store, key_id, model, "count"), "d")
        total = int(counted) if counted is not None else int(await store.redis.llen(distances_key))
        recent = await store.redis.lrange(distances_key, -self.params.window, -1)
        w = None
        if total > self.params.min_distances:
            w = await anyio.to_thread.run_sync(shapiro_w, np.array([float(v) for v in recent]))
        return {
            "distances": total,
            "w": w,
            "delta": self.params.delta,
            "flag": await self.flag_of(store, key_id, model),
        }

"""B4B and PRADA: formulas and state against literal references, on real Redis and on fakeredis."""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import fakeredis
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from redis.asyncio import Redis

from defenses.base import DefenseContext, build_defense, image_digests
from defenses.detectors import DETECTORS, PRADA, Detection, Detector, build_detector
from defenses.detectors import prada as prada_module
from defenses.detectors.prada import prada_reference, shapiro_w
from defenses.output.b4b import B4B, lsh_buckets, noise_scale
from defenses.state import DefenseStore

T = TypeVar("T")


def with_store(backend: str | None, body: Callable[[DefenseStore], Awaitable[T]]) -> T:
    """Run ``body(store)`` in a fresh event loop on the backend (None: fakeredis), unique prefix."""

    async def main() -> T:
        redis: Redis = (
            Redis.from_url(backend) if backend else fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        )
        try:
            return await body(DefenseStore(redis, prefix=f"t{uuid.uuid4().hex[:8]}"))
        finally:
            await redis.aclose()

    return asyncio.run(main())


def context(x: torch.Tensor, key: str = "alice") -> DefenseContext:
    return DefenseContext(key, "enc", image_digests((x * 255).to(torch.uint8).numpy()), b"s", inputs=x)


# ------------------------------------------------------------------------------------------------ B4B


def test_b4b_formulas() -> None:
    c = torch.tensor([0.0, 0.05, 0.1, 1.0])
    expected = torch.clamp(0.03 * (torch.exp(55 * c) - 1), max=10.0)
    torch.testing.assert_close(noise_scale(c, 0.03, 55.0, 1.0, 10.0), expected)
    e = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    literal = [sum(2**j for j in range(3) if float(h[j] @ e[i]) > 0) for i in range(7)]
    assert lsh_buckets(e, h) == literal
    with pytest.raises(ValidationError):
        B4B(n_bits=0)
    with pytest.raises(ValidationError):
        B4B(alpha=-1)


def test_b4b_needs_its_state() -> None:
    with pytest.raises(RuntimeError, match="observe"):
        B4B().apply(torch.randn(2, 8), context(torch.rand(2, 1, 4, 4)))


def test_b4b_coverage_is_exact_and_sequential(backend: str | None) -> None:
    b4b = B4B(n_bits=4, transform=False)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    x1, x2 = torch.rand(6, 1, 4, 4, generator=g), torch.rand(5, 1, 4, 4, generator=g)

    async def body(
        store: DefenseStore,
    ) -> tuple[list[float], list[float], dict[str, float], dict[str, float]]:
        c1, c2 = context(x1), context(x2)
        await b4b.observe(first, c1, store)
        await b4b.observe(second, c2, store)
        other = context(x1, key="bob")
        await b4b.observe(first[:1], other, store)
        return (
            c1.state["b4b"].tolist(),
            c2.state["b4b"].tolist(),
            await b4b.coverage(store, "alice", "enc"),
            await b4b.coverage(store, "bob", "enc"),
        )

    got1, got2, alice, bob = with_store(backend, body)
    planes = b4b.hyperplanes(context(x1), 8)
    buckets = lsh_buckets(torch.cat([first, second]), planes)
    running = [len(set(buckets[: i + 1])) / 16 for i in range(11)]
    assert got1 + got2 == pytest.approx(running)  # each image sees the coverage after itself
    assert alice["occupied_buckets"] == len(set(buckets)) and alice["buckets"] == 16
    assert bob["occupied_buckets"] == 1  # state is per key


def test_key_state_is_part_of_the_defense_contract() -> None:
    """The admin API reads a defense's per-key state through ``key_state`` alone: B4B's coverage,
    None for a stateless defense."""
    b4b, top_k = B4B(n_bits=4, transform=False), build_defense({"name": "top_k", "k": 2})
    x = torch.rand(3, 1, 4, 4)

    async def body(store: DefenseStore) -> tuple[object, object, object]:
        await b4b.observe(torch.randn(3, 8), context(x), store)
        return (
            await b4b.key_state(store, "alice", "enc"),
            await b4b.coverage(store, "alice", "enc"),
            await top_k.key_state(store, "alice", "enc"),
        )

    shown, coverage, stateless = with_store(None, body)
    assert shown == coverage and shown is not None and shown["occupied_buckets"] >= 1
    assert stateless is None


def test_b4b_noise_grows_with_coverage_and_transforms_are_per_key() -> None:
    b4b = B4B(alpha=0.1, lam=5.0, shift=0.5)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 16, generator=g)
    x = torch.rand(4, 1, 4, 4, generator=g)
    low, high = context(x), context(x)
    low.state["b4b"], high.state["b4b"] = torch.zeros(4), torch.full((4,), 0.9)
    matrix, shift = b4b.transformation(low, 16)
    clean = e @ matrix + shift
    torch.testing.assert_close(b4b.apply(e, low), clean)  # zero coverage: no noise
    noisy = b4b.apply(e, high)
    rms = e.norm(dim=1) / 4
    sigma = float(noise_scale(torch.tensor(0.9), 0.1, 5.0, 1.0, 10.0))
    # Undo the (invertible) transform: the noise has the cost function's scale.
    residual = torch.linalg.solve(matrix.T, (noisy - shift - clean).T).T
    assert float((residual.std(dim=1) / rms).mean()) == pytest.approx(sigma, rel=0.35)
    torch.testing.assert_close(b4b.apply(e, high), noisy)  # repeatable
    # The map is rotation x scale x permutation: pairwise distances keep their ratios.
    d_in, d_out = torch.cdist(e, e), torch.cdist(clean, clean)
    ratio = d_out[d_in > 0] / d_in[d_in > 0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-4, atol=1e-5)
    other = context(x, key="bob")
    other.state["b4b"] = torch.zeros(4)
    assert not torch.allclose(b4b.apply(e, other), clean)  # another key, another space


def test_b4b_transform_cache_is_bounded_by_bytes() -> None:
    """Many keys keep the per-key maps under ``CACHE_BYTES``; an evicted key's map comes back identical."""
    b4b = B4B()
    dim = 32
    per_key = (dim * dim + dim) * 4  # float32 matrix and shift
    b4b.CACHE_BYTES = 5 * per_key  # room for five keys
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    e = torch.randn(3, dim, generator=torch.Generator().manual_seed(1))

    def served(key: str) -> torch.Tensor:
        ctx = context(x, key=key)
        ctx.state["b4b"] = torch.zeros(3)
        return b4b.apply(e, ctx)

    first = served("key-0")
    for i in range(1, 50):
        served(f"key-{i}")
        assert b4b.cached_bytes <= b4b.CACHE_BYTES
    assert b4b.cached_bytes == 5 * per_key
    assert len(b4b._transforms) == 5
    assert "key-0" not in {k[1] for k in b4b._transforms}, "key-0 should have been evicted"
    torch.testing.assert_close(served("key-0"), first, rtol=0, atol=0)  # recomputed from the secret
    fresh = B4B()  # a map larger than the whole cache is not kept
    fresh.CACHE_BYTES = per_key - 1
    fresh.transformation(context(x, key="big"), dim)
    assert fresh.cached_bytes == 0 and not fresh._transforms


# ---------------------------------------------------------------------------------------------- PRADA


def test_prada_params() -> None:
    with pytest.raises(ValidationError, match="defend_with"):
        PRADA(action="defend")
    with pytest.raises(ValidationError):
        PRADA(delta=1.5)
    with pytest.raises(ValueError, match="unknown detector 'nope'; known: prada"):
        build_detector({"name": "nope"})
    assert DETECTORS.get("PRADA") is PRADA and isinstance(build_detector({"name": "prada"}), Detector)
    detector = build_detector({"name": "prada", "action": "defend", "defend_with": [{"name": "label_only"}]})
    detector.check("classifier")
    assert detector.fallback is not None and repr(detector.fallback) == "label_only()"
    with pytest.raises(ValueError, match="does not apply"):
        build_detector({"name": "prada", "action": "defend", "defend_with": [{"name": "label_only"}]}).check(
            "encoder"
        )


def test_a_new_detector_needs_only_the_contract() -> None:
    """A toy detector registered on DETECTORS is built from a spec, checked, flags through
    ``raise_flag`` and is read back by ``flag_of``, as the server does with any detector."""

    class EveryQuery(Detector):
        name = "every_query"

        async def observe(
            self, store: DefenseStore, key_id: str, model: str, inputs: torch.Tensor, classes: list[int]
        ) -> Detection:
            _, newly = await self.raise_flag(store, key_id, model, {"queries": len(inputs)})
            return Detection(distances=len(inputs), w=None, flagged=True, newly_flagged=newly)

        async def state(self, store: DefenseStore, key_id: str, model: str) -> dict[str, object]:
            return {"flag": await self.flag_of(store, key_id, model)}

    DETECTORS.register(EveryQuery)
    try:
        detector = build_detector(
            {"name": "every-query", "action": "defend", "defend_with": [{"name": "top_k"}]}
        )
        detector.check("classifier")
        assert detector.fallback is not None and detector.params.action == "defend"

        async def body(store: DefenseStore) -> tuple[object, object, object, object]:
            before = await detector.flag_of(store, "alice", "clf")
            first = await detector.observe(store, "alice", "clf", torch.rand(2, 1, 4, 4), [0, 1])
            second = await detector.observe(store, "alice", "clf", torch.rand(1, 1, 4, 4), [0])
            return before, first, second, await detector.state(store, "alice", "clf")

        before, first, second, state = with_store(None, body)
        assert before is None and first.newly_flagged and not second.newly_flagged
        flag = state["flag"]  # type: ignore[index]
        assert flag["flag"] == "extraction_suspected" and flag["detector"] == "every_query"
        assert flag["queries"] == 2 and flag["action"] == "defend"
    finally:
        DETECTORS.unregister("every_query")


def test_shapiro_w() -> None:
    rng = np.random.default_rng(0)
    assert shapiro_w(rng.normal(size=500)) > 0.99
    assert shapiro_w(np.concatenate([rng.normal(0, 0.1, 250), rng.normal(5, 0.1, 250)])) < 0.8
    assert shapiro_w(np.ones(50)) == 1.0


def test_prada_state_matches_algorithm_1(backend: str | None) -> None:
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(40, 1, 6, 6, generator=g) * 255).round() / 255
    classes = torch.randint(0, 3, (40,), generator=g).tolist()
    prada = PRADA(min_distances=5)

    async def body(store: DefenseStore) -> tuple[list[float], dict[int, int], list[Any]]:
        detections = []
        for start, stop in [(0, 7), (7, 8), (8, 25), (25, 40)]:  # batches of several sizes
            detections.append(
                await prada.observe(store, "alice", "m", images[start:stop], classes[start:stop])
            )
        distances = [float(v) for v in await store.redis.lrange(prada._key(store, "alice", "m", "d"), 0, -1)]
        sizes = {
            c: int(await store.redis.llen(prada._key(store, "alice", "m", "g", str(c)))) for c in range(3)
        }
        return distances, sizes, detections

    distances, sizes, detections = with_store(backend, body)
    ref_distances, ref_growing, _ = prada_reference(images, classes)
    assert distances == pytest.approx(ref_distances, rel=1e-9)
    assert sizes == {c: len(ref_growing.get(c, [])) for c in range(3)}
    assert detections[-1].distances == len(ref_distances)
    assert detections[-1].w == pytest.approx(shapiro_w(np.array(ref_distances)))


def test_prada_state_is_shared_by_two_detector_instances(backend: str | None) -> None:
    """Two PRADA objects (as two workers would hold) on one store compute what one would."""
    g = torch.Generator().manual_seed(4)
    images = (torch.rand(30, 1, 5, 5, generator=g) * 255).round() / 255
    classes = [0] * 30
    a, b = PRADA(min_distances=5), PRADA(min_distances=5)

    async def body(store: DefenseStore) -> list[float]:
        for i, start in enumerate(range(0, 30, 5)):
            await (a if i % 2 == 0 else b).observe(
                store, "k", "m", images[start : start + 5], classes[start : start + 5]
            )
        return [float(v) for v in await store.redis.lrange(a._key(store, "k", "m", "d"), 0, -1)]

    assert with_store(backend, body) == pytest.approx(prada_reference(images, classes)[0], rel=1e-9)


def natural_and_synthetic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Honest: independent smooth random images. Attack: small perturbations of a few seeds."""
    g = torch.Generator().manual_seed(0)
    honest = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 16, 16, generator=g), 3, 1, 1)
    seeds = honest[:10]
    steps = torch.randint(0, 10, (n,), generator=g)
    attack = (seeds[steps] + 0.01 * torch.randn(n, 1, 16, 16, generator=g)).clamp(0, 1)
    attack[::10] = torch.rand(math.ceil(n / 10), 1, 16, 16, generator=g)  # some far jumps, as JbDA explores
    return honest, attack


def test_prada_flags_an_extraction_stream_not_an_honest_one(backend: str | None) -> None:
    honest, attack = natural_and_synthetic(300)
    prada = PRADA(delta=0.9, min_distances=100)

    async def body(store: DefenseStore) -> tuple[Any, Any, dict[str, Any]]:
        for start in range(0, 300, 50):
            h = await prada.observe(store, "honest", "m", honest[start : start + 50], [0] * 50)
            a = await prada.observe(store, "thief", "m", attack[start : start + 50], [0] * 50)
        return h, a, await store.flags("thief")

    h, a, flags = with_store(backend, body)
    assert h.w is not None and h.w > 0.9 and not h.flagged
    assert a.w is not None and a.w < 0.9 and a.flagged
    assert flags["m"]["flag"] == "extraction_suspected" and flags["m"]["w"] < 0.9


def stored_rows(raw: list[bytes]) -> torch.Tensor:
    """A growing set as Redis holds it, ``[m, dim]`` in [0, 1]."""
    return torch.from_numpy(np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), -1).copy()) / 255


async def assert_cache_matches_redis(prada: PRADA, store: DefenseStore) -> None:
    """Every growing set a worker caches is what Redis holds."""
    for name, entry in prada._sets.items():
        torch.testing.assert_close(
            entry.rows.float() / 255, stored_rows(await store.redis.lrange(name, 0, -1))
        )


def test_prada_state_is_bounded(backend: str | None) -> None:
    """Redis keeps the last ``window`` distances and ``max_set_size`` members per class; the
    distances, thresholds and W are Algorithm 1's with the oldest member evicted past that size."""
    g = torch.Generator().manual_seed(5)
    spread = torch.linspace(0.1, 1, 60).reshape(60, 1, 1, 1)  # ever farther queries: the sets grow
    images = (torch.rand(60, 1, 5, 5, generator=g) * spread * 255).round() / 255
    classes = torch.randint(0, 2, (60,), generator=g).tolist()
    a, b = (
        PRADA(min_distances=5, window=10, max_set_size=4),
        PRADA(min_distances=5, window=10, max_set_size=4),
    )

    async def body(
        store: DefenseStore,
    ) -> tuple[list[Any], list[float], dict[int, list[bytes]], dict[str, float]]:
        detections = []
        for i, (start, stop) in enumerate([(0, 7), (7, 8), (8, 25), (25, 31), (31, 60)]):
            prada = a if i % 2 == 0 else b  # two workers, each with its cache
            detections.append(await prada.observe(store, "k", "m", images[start:stop], classes[start:stop]))
            await assert_cache_matches_redis(prada, store)
        distances = [float(v) for v in await store.redis.lrange(a._key(store, "k", "m", "d"), 0, -1)]
        sets = {c: await store.redis.lrange(a._key(store, "k", "m", "g", str(c)), 0, -1) for c in range(2)}
        raw = await store.redis.hgetall(a._key(store, "k", "m", "stats"))
        stats = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
        return detections, distances, sets, stats

    detections, distances, sets, stats = with_store(backend, body)
    ref_distances, ref_growing, ref_threshold = prada_reference(images, classes, max_set_size=4)
    unbounded_distances, unbounded_growing, _ = prada_reference(images, classes)
    assert min(len(unbounded_growing[c]) for c in range(2)) > 4  # eviction happened
    assert unbounded_distances != pytest.approx(ref_distances, rel=1e-9)  # and mattered
    assert distances == pytest.approx(ref_distances[-10:], rel=1e-9)  # only the window is kept
    assert detections[-1].distances == len(ref_distances)  # but all are counted
    assert detections[-1].w == pytest.approx(shapiro_w(np.array(ref_distances[-10:])))
    for c in range(2):
        assert len(sets[c]) == len(ref_growing[c]) == 4
        flat = images.reshape(60, -1)
        torch.testing.assert_close(stored_rows(sets[c]), flat[ref_growing[c]])
        assert stats[f"t:{c}"] == pytest.approx(ref_threshold[c], rel=1e-9)  # T_c over all of D_c


def off_loop() -> bool:
    """True when no event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def test_prada_computes_off_the_event_loop(backend: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The distances and the Shapiro-Wilk test run in a worker thread, never on the event loop."""
    calls: list[tuple[str, bool]] = []
    cdist, shapiro = torch.cdist, prada_module.shapiro_w

    def watched_cdist(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(("cdist", off_loop()))
        return cdist(*args, **kwargs)

    def watched_shapiro(distances: np.ndarray) -> float:
        calls.append(("shapiro", off_loop()))
        return shapiro(distances)

    monkeypatch.setattr(torch, "cdist", watched_cdist)
    monkeypatch.setattr(prada_module, "shapiro_w", watched_shapiro)
    images = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    prada = PRADA(min_distances=3)

    async def body(store: DefenseStore) -> None:
        await prada.observe(store, "k", "m", images, [0] * 12)
        await prada.state(store, "k", "m")

    with_store(backend, body)
    assert {name for name, _ in calls} == {"cdist", "shapiro"}
    assert all(off for _, off in calls), calls


def in_other_worker(
    connect: Callable[[], Redis], prefix: str, body: Callable[[DefenseStore], Awaitable[None]]
) -> None:
    """Run ``body`` as another process's worker would: its own thread, event loop and connection."""

    async def main() -> None:
        redis = connect()
        try:
            await body(DefenseStore(redis, prefix=prefix))
        finally:
            await redis.aclose()

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    thread.join()


def during_distances(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` once, in the middle of the next request's distance computation."""
    cdist, armed = torch.cdist, [True]

    def hooked(*args: Any, **kwargs: Any) -> torch.Tensor:
        if armed[0]:
            armed[0] = False
            action()
        return cdist(*args, **kwargs)

    monkeypatch.setattr(torch, "cdist", hooked)


def test_prada_cache_follows_redis_when_the_lock_ran_out(
    backend: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A's lock expires mid-update and worker B appends to the set first: A must not go on
    with a cached set out of step with Redis (it would miss B's member)."""
    g = torch.Generator().manual_seed(6)
    p0, p1, p2 = ((torch.rand(3, 1, 5, 5, generator=g) * 255).round() / 255).split(1)
    a, b = PRADA(min_distances=3), PRADA(min_distances=3)
    server, prefix = fakeredis.FakeServer(), f"t{uuid.uuid4().hex[:8]}"

    def connect() -> Redis:
        return Redis.from_url(backend) if backend else fakeredis.FakeAsyncRedis(server=server)

    async def b_writes(store: DefenseStore) -> None:
        await store.redis.delete(a._key(store, "k", "m", "lock"))  # A's lock expired
        await b.observe(store, "k", "m", p2, [0])

    async def main() -> list[float]:
        redis = connect()
        store = DefenseStore(redis, prefix=prefix)
        try:
            await a.observe(store, "k", "m", p0, [0])
            during_distances(monkeypatch, lambda: in_other_worker(connect, prefix, b_writes))
            await a.observe(store, "k", "m", p1, [0])  # B appends p2 while A computes
            await assert_cache_matches_redis(a, store)
            await a.observe(store, "k", "m", p2, [0])  # p2 is in G_0: its distance is 0
            await assert_cache_matches_redis(a, store)
            return [float(v) for v in await redis.lrange(a._key(store, "k", "m", "d"), 0, -1)]
        finally:
            await redis.aclose()

    distances = asyncio.run(main())
    assert len(distances) == 3 and distances[-1] == 0.0


def test_prada_forgets_a_key_whose_lock_was_taken(
    backend: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When releasing finds the lock another's (it expired during the update), the worker drops its
    cached sets of that key, and only of that key."""
    images = (torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(7)) * 255).round() / 255
    prada = PRADA(min_distances=3)
    server, prefix = fakeredis.FakeServer(), f"t{uuid.uuid4().hex[:8]}"

    def connect() -> Redis:
        return Redis.from_url(backend) if backend else fakeredis.FakeAsyncRedis(server=server)

    async def take_lock(store: DefenseStore) -> None:
        await store.redis.set(prada._key(store, "k", "m", "lock"), "another-worker", px=50)

    async def main() -> tuple[set[str], set[str]]:
        redis = connect()
        store = DefenseStore(redis, prefix=prefix)
        try:
            await prada.observe(store, "other", "m", images[:2], [0, 1])
            await prada.observe(store, "k", "m", images[:2], [0, 1])
            before = set(prada._sets)
            during_distances(monkeypatch, lambda: in_other_worker(connect, prefix, take_lock))
            await prada.observe(store, "k", "m", images[2:], [0, 1])
            return before, set(prada._sets)
        finally:
            await redis.aclose()

    before, after = asyncio.run(main())
    assert {name.split(":")[1] for name in before} == {"{k}", "{other}"}
    assert {name.split(":")[1] for name in after} == {"{other}"}


def test_prada_cache_is_bounded_by_bytes() -> None:
    """Many keys keep the worker's cached sets under ``CACHE_BYTES``, with the same results."""
    g = torch.Generator().manual_seed(8)
    images = (torch.rand(20, 1, 4, 4, generator=g) * 255).round() / 255
    classes = torch.randint(0, 2, (20,), generator=g).tolist()
    prada = PRADA(min_distances=3)
    prada.CACHE_BYTES = 5 * 16  # five 16-pixel rows

    async def body(store: DefenseStore) -> list[list[float]]:
        runs = []
        for key in [f"key-{i}" for i in range(6)]:
            for start in range(0, 20, 5):
                await prada.observe(store, key, "m", images[start : start + 5], classes[start : start + 5])
                assert prada.cached_bytes <= prada.CACHE_BYTES
                await assert_cache_matches_redis(prada, store)
            runs.append([float(v) for v in await store.redis.lrange(prada._key(store, key, "m", "d"), 0, -1)])
        return runs

    runs = with_store(None, body)
    expected = prada_reference(images, classes)[0]
    assert all(run == pytest.approx(expected, rel=1e-9) for run in runs)

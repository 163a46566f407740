"""B4B and PRADA: formulas and state against literal references, on real Redis and on fakeredis."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import fakeredis
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from redis.asyncio import Redis

from defenses.base import DefenseContext, image_digests
from defenses.detectors import PRADA, build_detector
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


# ---------------------------------------------------------------------------------------------- PRADA


def test_prada_params() -> None:
    with pytest.raises(ValidationError, match="defend_with"):
        PRADA(action="defend")
    with pytest.raises(ValidationError):
        PRADA(delta=1.5)
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector({"name": "nope"})
    detector = build_detector({"name": "prada", "action": "defend", "defend_with": [{"name": "label_only"}]})
    detector.check("classifier")
    assert detector.fallback is not None and repr(detector.fallback) == "label_only()"
    with pytest.raises(ValueError, match="does not apply"):
        build_detector({"name": "prada", "action": "defend", "defend_with": [{"name": "label_only"}]}).check(
            "encoder"
        )


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

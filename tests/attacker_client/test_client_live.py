"""The SDK against a live uvicorn + real Redis: chunking, transports, typed errors, cache, async.

One server (max batch 4) serves the whole module, to keep the suite fast on 2 shared cores; every
test makes its own key, so usage counts are per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from attacker_client import errors
from attacker_client.client import AsyncVictimClient, VictimClient
from tests.conftest import create_key, run_live_server

N = 10


@pytest.fixture(scope="module")
def server(model_store: Path, redis_url: str) -> Iterator[tuple[str, httpx.Client]]:
    with (
        run_live_server(model_store, redis_url, STEALRANGE_MAX_BATCH="4") as url,
        httpx.Client(base_url=url) as admin,
    ):
        yield url, admin


def new_key(admin: httpx.Client, **spec: object) -> str:
    _, headers = create_key(admin, **spec)
    return headers["Authorization"].removeprefix("Bearer ")


def images(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def test_chunking_and_transports_agree(server: tuple[str, httpx.Client]) -> None:
    url, admin = server
    x = images()
    with VictimClient(url, new_key(admin, budget=1000, tier="research")) as client:
        assert {m["id"] for m in client.list_models()} >= {"clf", "enc"}
        assert client.model_metadata("clf")["max_batch"] == 4
        probs = client.predict("clf", x)
        assert probs.shape == (N, 10) and probs.dtype == np.float32
        assert client.usage()["used"] == N  # 3 requests of 4 + 4 + 2 images, 1 query per image
        assert client.last_budget is not None and client.last_budget.used == N
        np.testing.assert_allclose(client.predict("clf", x, transport="json"), probs, rtol=1e-5, atol=1e-6)
        labels = client.predict("clf", x, mode="label")
        assert labels.tolist() == probs.argmax(1).tolist()
        indices, top = client.predict("clf", x, mode="top_k", top_k=3)
        assert indices.shape == top.shape == (N, 3)
        assert indices[:, 0].tolist() == labels.tolist()
        logits = client.predict("clf", x[:2], mode="logits")
        assert logits.shape == (2, 10)

        emb = client.embed("enc", x)
        assert emb.shape == (N, 64) and emb.dtype == np.float32
        np.testing.assert_allclose(client.embed("enc", x, transport="json"), emb, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(client.embed("enc", x, transport="openai"), emb, rtol=1e-5, atol=1e-6)
        assert client.usage()["used"] == 7 * N + 2


def test_typed_errors_live(server: tuple[str, httpx.Client]) -> None:
    url, admin = server
    with VictimClient(url, new_key(admin, budget=5)) as client:
        client.predict("clf", images(5))
        with pytest.raises(errors.BudgetExhaustedError) as info:
            client.predict("clf", images(1, seed=1))
        assert info.value.code == "budget_exhausted" and info.value.request_id
        assert client.last_budget is not None and client.last_budget.remaining == 0

    with VictimClient(url, new_key(admin, tier="label")) as client:
        assert client.predict("clf", images(2), mode="label").shape == (2,)
        with pytest.raises(errors.PermissionDeniedError) as denied:
            client.predict("clf", images(2), mode="probabilities")
        assert denied.value.code == "mode_not_allowed" and denied.value.request_id

    with VictimClient(url, "sk-wrong") as client, pytest.raises(errors.AuthenticationError):
        client.usage()
    with VictimClient(url, new_key(admin)) as client, pytest.raises(errors.NotFoundError):
        client.model_metadata("nope")


def test_cache_hits_spend_no_budget(server: tuple[str, httpx.Client], tmp_path: Path) -> None:
    url, admin = server
    key = new_key(admin, budget=100)
    x = images()
    with VictimClient(url, key, cache=tmp_path / "cache") as client:
        first = client.embed("enc", x[:6])
        assert client.usage()["used"] == 6
        both = client.embed("enc", x)  # 6 cached, only 4 new images are sent
        assert client.usage()["used"] == 10
        np.testing.assert_array_equal(both[:6], first)
    with VictimClient(url, key, cache=tmp_path / "cache") as client:  # a new process, same cache
        again = client.embed("enc", np.concatenate([x[::-1], x[:1]]))
        np.testing.assert_array_equal(again, np.concatenate([both[::-1], both[:1]]))
        probs = client.predict("clf", x[:3])  # another model / mode is another entry
        np.testing.assert_array_equal(client.predict("clf", x[:3]), probs)
        assert client.usage()["used"] == 13


def test_async_concurrency_matches_sync(server: tuple[str, httpx.Client]) -> None:
    url, admin = server
    key = new_key(admin, budget=1000)
    x = images(N, seed=3)
    with VictimClient(url, key) as client:
        expected = client.embed("enc", x)

    async def go() -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
        async with AsyncVictimClient(url, key, max_concurrency=2) as client:
            emb, probs = await asyncio.gather(client.embed("enc", x), client.predict("clf", x))
            return emb, probs, await client.usage()

    emb, probs, usage = asyncio.run(go())
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    assert probs.shape == (N, 10)
    assert usage["used"] == 3 * N


@pytest.mark.parametrize("use_async", [False, True])
def test_chunks_paid_before_a_failure_stay_cached(
    server: tuple[str, httpx.Client], tmp_path: Path, use_async: bool
) -> None:
    """Budget 6, max batch 4, 10 images in chunks of 4, 4, 2: the second chunk is refused. What was
    paid stays in the cache (sync stops at the refusal: 4; async runs every chunk: 4 + 2), and a
    rerun with a fresh key pays only for the rest."""
    url, admin = server
    x = images(N, seed=5)
    key = new_key(admin, budget=6)
    cache = tmp_path / "cache"
    if use_async:

        async def go() -> None:
            async with AsyncVictimClient(url, key, cache=cache, max_concurrency=1) as client:
                await client.embed("enc", x)

        with pytest.raises(errors.BudgetExhaustedError):
            asyncio.run(go())
    else:
        with VictimClient(url, key, cache=cache) as client, pytest.raises(errors.BudgetExhaustedError):
            client.embed("enc", x)
    paid = 6 if use_async else 4
    with VictimClient(url, key, cache=cache) as client:
        assert client.usage()["used"] == paid
        assert client.cache is not None and len(client.cache) == paid
    with VictimClient(url, new_key(admin, budget=100), cache=cache) as client:
        assert client.embed("enc", x).shape == (N, 64)
        assert client.usage()["used"] == N - paid

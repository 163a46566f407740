"""Dynamic batching and the long-lived inference thread (issue 19).

Concurrency is real: the app runs in-process with its lifespan, and requests go through
``httpx.ASGITransport`` from ``asyncio.gather``, so they reach the batcher together. Where a test
needs requests to share one forward it sets a generous queue delay (the first request waits for
the others), and checks that they did through the statistics extension (one execution of the
whole batch).

A batched forward can differ from an unbatched one in the last bits of a float (the kernels chosen
for a batch of 1 and of 5 are not the same), so answers are compared at 1e-5 where keyed noise is
of order 0.5, and input rows, which are not computed, exactly.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio.to_thread
import fakeredis
import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from pydantic import ValidationError

from common.wire import decode_infer_response, infer_request
from defenses.config import DefenseConfig, write_defense_config
from server.app import create_app
from server.batching import BatchingPolicy, InferenceWorker, ModelBatcher, policy_for
from server.registry import ModelRegistry, ServedModel
from server.settings import BatchingOverride, ServerSettings
from server.stats import ModelStats, RequestTimes
from tests.conftest import admin_headers, error_of, make_settings

INFER = "/v2/models/{}/infer"
DELAY_US = 300_000  # long enough for every request of a gather to join the first one's forward


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@asynccontextmanager
async def serving(settings: ServerSettings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan (inference threads, statistics flusher), and a client of it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as http:
            yield app, http


async def new_key(http: httpx.AsyncClient, **spec: Any) -> tuple[str, dict[str, str]]:
    response = await http.post("/admin/keys", json=spec, headers=admin_headers())
    assert response.status_code == 201, response.text
    return response.json()["record"]["key_id"], {"Authorization": f"Bearer {response.json()['api_key']}"}


async def ask(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    model: str,
    x: np.ndarray,
    output: str,
    parameters: dict[str, Any] | None = None,
) -> httpx.Response:
    body, extra = infer_request(x, [output], binary=True, parameters=parameters)
    return await http.post(INFER.format(model), content=body, headers={**headers, **extra})


def outputs_of(response: httpx.Response, name: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    header_length = response.headers.get("inference-header-content-length")
    return decode_infer_response(response.content, header_length)[name]


async def model_stats(http: httpx.AsyncClient, headers: dict[str, str], model: str) -> dict[str, Any]:
    response = await http.get(f"/v2/models/{model}/stats", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["model_stats"][0]


# ----------------------------------------------------------------------------- the batcher itself


@pytest.fixture(scope="module")
def served(model_store: Path) -> ServedModel:
    return ModelRegistry.load(model_store).models["clf"]


def run_blocked(
    served: ServedModel, policy: BatchingPolicy, requests: list[np.ndarray]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[dict[str, Any]]]:
    """Queue the requests while the worker is held busy, release it, and return each request's
    (input rows, logit rows) and the batch statistics of the forwards it ran."""
    stats = ModelStats(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), "t")
    worker = InferenceWorker("test-inference", 1)
    batcher = ModelBatcher(served, policy, worker, stats)
    release = threading.Event()

    def rows(
        x: torch.Tensor, raw: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert raw[1] is not None
        return x, raw[1]

    async def main() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        held = asyncio.ensure_future(worker.call(lambda: release.wait(10)))
        await asyncio.sleep(0.05)  # the worker is now inside the call
        submitted = [
            asyncio.ensure_future(batcher.submit(x, RequestTimes(images=len(x)), rows)) for x in requests
        ]
        await asyncio.sleep(0.05)  # every request is queued
        release.set()
        await held
        answers = await asyncio.gather(*submitted)
        return answers, await stats.read("clf", "v")

    try:
        answers, entry = asyncio.run(main())
    finally:
        worker.stop()
    assert entry["inference_count"] == 0  # requests are recorded by the service, forwards here
    return answers, entry["batch_stats"]


def batches(batch_stats: list[dict[str, Any]]) -> dict[int, int]:
    """Batch size -> forwards of that size."""
    return {entry["batch_size"]: entry["compute_infer"]["count"] for entry in batch_stats}


def as_input(x: np.ndarray) -> np.ndarray:
    """What the model's input rows of ``x`` must be: [0, 1] floats."""
    return x if x.dtype == np.float32 else x.astype(np.float32) / 255


def test_each_request_gets_exactly_its_own_rows(served: ServedModel) -> None:
    """Five requests, one of them FP32 among UINT8 ones, in one forward: each gets its own input
    rows (exactly) and its own outputs (as its forward alone gives them)."""
    requests = [images(n, seed=i) for i, n in enumerate([1, 3, 2, 1, 4])]
    requests[2] = requests[2].astype(np.float32) / 255
    answers, batch_stats = run_blocked(served, BatchingPolicy(max_batch_images=64), requests)
    assert batches(batch_stats) == {11: 1}  # one forward for all five
    for x, (x_rows, logits) in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(x_rows.numpy(), as_input(x))
        alone = served.forward(served.to_model_input(x))[1]
        assert alone is not None and logits.shape == alone.shape
        np.testing.assert_allclose(logits.numpy(), alone.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("policy", "sizes", "expected"),
    [
        # Full: cut at max_batch_images; a request is never split, so 3 then 2 + 1.
        (BatchingPolicy(max_batch_images=4), [3, 2, 1], {3: 2}),
        # A request larger than max_batch_images runs alone.
        (BatchingPolicy(max_batch_images=4), [5, 1, 1], {5: 1, 2: 1}),
        # A preferred size the queue can fill is cut at once; the rest runs after it.
        (BatchingPolicy(max_batch_images=8, preferred_batch_sizes=(4,)), [1] * 7, {4: 1, 3: 1}),
        (BatchingPolicy(max_batch_images=8, preferred_batch_sizes=(2, 4)), [1] * 3, {2: 1, 1: 1}),
        # Off: one forward per request.
        (BatchingPolicy(enabled=False), [1, 2, 1], {1: 2, 2: 1}),
    ],
)
def test_policy_cuts_batches(
    served: ServedModel, policy: BatchingPolicy, sizes: list[int], expected: dict[int, int]
) -> None:
    requests = [images(n, seed=i) for i, n in enumerate(sizes)]
    answers, batch_stats = run_blocked(served, policy, requests)
    assert batches(batch_stats) == expected
    for x, (x_rows, _) in zip(requests, answers, strict=True):  # however cut, each has its own rows
        np.testing.assert_array_equal(x_rows.numpy(), as_input(x))


# --------------------------------------------------------------------------------------- settings


def test_policy_from_settings_and_per_model_overrides(
    model_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEALRANGE_BATCH_QUEUE_DELAY_US", "250")
    monkeypatch.setenv("STEALRANGE_BATCH_PREFERRED_SIZES", "[16, 4, 16]")
    monkeypatch.setenv(
        "STEALRANGE_MODEL_BATCHING", '{"enc": {"enabled": false}, "clf": {"max_queue_delay_us": 0}}'
    )
    settings = ServerSettings(model_store=model_store, max_batch=128)
    assert policy_for(settings, "other") == BatchingPolicy(True, 128, 250_000, (4, 16))
    assert policy_for(settings, "clf") == BatchingPolicy(True, 128, 0, (4, 16))
    assert policy_for(settings, "enc").enabled is False
    app = create_app(settings)
    assert app.state.service.batchers["enc"].policy.enabled is False
    assert app.state.service.batchers["clf"].policy.max_queue_delay_ns == 0


@pytest.mark.parametrize(
    "value",
    [
        '{"clf": {"max_queue_delay_us": -1}}',
        '{"clf": {"preferred_batch_sizes": [0]}}',
        '{"clf": {"delay": 5}}',
        '{"clf": {"max_batch_images": 0}}',
        "not json",
    ],
)
def test_bad_batching_settings_are_refused(
    model_store: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("STEALRANGE_MODEL_BATCHING", value)
    with pytest.raises((ValidationError, ValueError)):
        ServerSettings(model_store=model_store)


def test_batching_for_a_model_not_served_stops_startup(model_store: Path) -> None:
    settings = make_settings(model_store, None, model_batching={"nope": BatchingOverride(enabled=False)})
    with pytest.raises(ValueError, match="not served: nope"):
        create_app(settings)


# -------------------------------------------------------------------------------- through the API


def test_every_forward_runs_on_one_long_lived_thread(
    model_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 1 of the issue: no thread hop per request: every forward, of every request and both
    models, on the same inference thread, never the event loop's."""
    threads: set[str] = set()

    async def main() -> str:
        async with serving(make_settings(model_store, None)) as (app, http):
            for name in ("clf", "enc"):
                model = app.state.registry.models[name]
                original = model.forward

                def spy(x: torch.Tensor, original: Callable[..., Any] = original) -> Any:
                    threads.add(threading.current_thread().name)
                    return original(x)

                monkeypatch.setattr(model, "forward", spy)
            _, headers = await new_key(http)
            for i in range(6):
                outputs_of(await ask(http, headers, "clf", images(1, i), "probabilities"), "probabilities")
                outputs_of(await ask(http, headers, "enc", images(2, i), "embedding"), "embedding")
            await asyncio.gather(*(ask(http, headers, "clf", images(1, i), "label") for i in range(8)))
            return threading.current_thread().name

    loop_thread = asyncio.run(main())
    assert threads == {"stealrange-inference-0"} and loop_thread not in threads


@pytest.mark.parametrize(
    ("inline_cpu_bytes", "hops_per_request"), [(8192, []), (0, ["_kserve_batch", "encode_infer_response"])]
)
def test_a_small_request_pays_no_thread_hop(
    model_store: Path, monkeypatch: pytest.MonkeyPatch, inline_cpu_bytes: int, hops_per_request: list[str]
) -> None:
    """Item 1 of the issue: the forward pays no thread-pool hop, and neither do the dependencies
    (FastAPI runs a plain ``def`` dependency in its thread pool); a 1-image body is parsed and its
    answer encoded on the loop (``inline_cpu_bytes``, default 8 KiB): no hop at all. With
    ``inline_cpu_bytes=0`` exactly those two remain."""
    hops: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await run_sync(fn, *args, **kwargs)

    async def main() -> None:
        settings = make_settings(model_store, None, inline_cpu_bytes=inline_cpu_bytes)
        async with serving(settings) as (_, http):
            _, headers = await new_key(http)
            monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
            for i in range(5):
                outputs_of(await ask(http, headers, "clf", images(1, i), "probabilities"), "probabilities")
            monkeypatch.undo()

    asyncio.run(main())
    assert sorted(hops) == sorted(hops_per_request * 5)


def test_concurrent_requests_share_forwards_and_stats_count_them(
    model_store: Path, backend: str | None
) -> None:
    settings = make_settings(model_store, backend, batch_queue_delay_us=DELAY_US)
    sizes = [1, 2, 1, 3, 1, 1]

    async def main() -> None:
        async with serving(settings) as (_, http):
            keys = [await new_key(http, tier="research") for _ in range(3)]
            xs = [images(n, seed=10 + i) for i, n in enumerate(sizes)]
            alone = [
                outputs_of(await ask(http, keys[0][1], "clf", x, "logits"), "logits") for x in xs
            ]  # one at a time: each its own forward
            before = await model_stats(http, keys[0][1], "clf")
            answers = await asyncio.gather(
                *(ask(http, keys[i % 3][1], "clf", x, "logits") for i, x in enumerate(xs))
            )
            after = await model_stats(http, keys[0][1], "clf")
            for x, solo, answer in zip(xs, alone, answers, strict=True):
                batched = outputs_of(answer, "logits")
                assert batched.shape == (len(x), 10)
                np.testing.assert_allclose(batched, solo, rtol=0, atol=1e-6)
            for key_id, headers in keys:
                usage = (await http.get("/v1/usage", headers=headers)).json()
                mine = [n for i, n in enumerate(sizes) if keys[i % 3][0] == key_id]
                assert usage["used"] == sum(mine) + (sum(sizes) if headers == keys[0][1] else 0)
        assert before["execution_count"] == len(sizes)
        assert before["inference_count"] == sum(sizes)
        assert after["execution_count"] - before["execution_count"] == 1  # all six in one forward
        assert after["inference_count"] - before["inference_count"] == sum(sizes)
        assert after["inference_stats"]["success"]["count"] == 2 * len(sizes)
        per_size = batches(after["batch_stats"])
        assert per_size[sum(sizes)] == 1
        assert sum(size * count for size, count in per_size.items()) == after["inference_count"]
        assert sum(per_size.values()) == after["execution_count"]

    asyncio.run(main())


def test_failed_batch_fails_and_refunds_each_request_alone(
    model_store: Path, backend: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward that fails fails every request in it, each refunded alone (its own n, its own
    request id); a request whose own outputs fail fails alone, and its batch-mates are served."""
    settings = make_settings(model_store, backend, batch_queue_delay_us=DELAY_US)

    async def main() -> None:
        async with serving(settings) as (app, http):
            served = app.state.registry.models["clf"]
            alice_id, alice = await new_key(http, budget=100)
            bob_id, bob = await new_key(http, budget=100)
            requests = [(alice, 2), (bob, 3), (alice, 1)]

            def broken(x: torch.Tensor) -> Any:
                raise RuntimeError("the accelerator fell over")

            monkeypatch.setattr(served, "forward", broken)
            before = await model_stats(http, alice, "clf")
            failed = await asyncio.gather(
                *(ask(http, h, "clf", images(n, seed=n), "probabilities") for h, n in requests)
            )
            monkeypatch.undo()
            for response in failed:
                assert response.status_code == 503 and error_of(response)["code"] == "inference_failed"
            for key_id, headers, charged in ((alice_id, alice, [2, 1]), (bob_id, bob, [3])):
                assert (await http.get("/v1/usage", headers=headers)).json()["used"] == 0
                events = (await http.get(f"/admin/keys/{key_id}/audit", headers=admin_headers())).json()
                charges = [e for e in events if e["event"] == "charge"]
                refunds = [e for e in events if e["event"] == "refund"]
                assert sorted(int(e["n"]) for e in charges) == sorted(charged)
                assert {(e["request_id"], e["n"]) for e in refunds} == {
                    (e["request_id"], e["n"]) for e in charges
                }
            after = await model_stats(http, alice, "clf")
            assert after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 3
            assert after["execution_count"] == before["execution_count"]  # no forward succeeded

            # One request's own outputs fail (here: only the one asking top_k 3); the others in its
            # forward are served and charged.
            original = served.finish

            def finish(raw: Any, outputs: list[str], top_k: int, *args: Any) -> Any:
                if top_k == 3:
                    raise RuntimeError("this request's defense fell over")
                return original(raw, outputs, top_k, *args)

            monkeypatch.setattr(served, "finish", finish)
            mixed = await asyncio.gather(
                ask(http, alice, "clf", images(2, 1), "top_k_indices", {"top_k": 3}),
                ask(http, bob, "clf", images(3, 2), "top_k_indices", {"top_k": 2}),
                ask(http, alice, "clf", images(1, 3), "top_k_indices", {"top_k": 2}),
            )
            monkeypatch.undo()
            assert [r.status_code for r in mixed] == [503, 200, 200]
            assert outputs_of(mixed[1], "top_k_indices").shape == (3, 2)
            assert (await http.get("/v1/usage", headers=alice)).json()["used"] == 1
            assert (await http.get("/v1/usage", headers=bob)).json()["used"] == 3
            final = await model_stats(http, alice, "clf")
            assert final["execution_count"] == after["execution_count"] + 1

    asyncio.run(main())


@pytest.fixture
def noisy_store(model_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    write_defense_config(
        store / "enc", DefenseConfig(default=[{"name": "embedding_noise", "sigma": 0.5, "relative": False}])
    )
    write_defense_config(store / "clf", DefenseConfig(default=[{"name": "probability_noise", "scale": 0.2}]))
    return store


@pytest.mark.parametrize(("model", "output"), [("enc", "embedding"), ("clf", "probabilities")])
def test_keyed_noise_does_not_depend_on_who_shared_the_batch(
    noisy_store: Path, model: str, output: str
) -> None:
    """The same request answered alone and batched with other keys' requests (in another position
    of the batch) gets the same noisy answer; another key asking the same images gets other noise."""
    settings = make_settings(noisy_store, None, batch_queue_delay_us=DELAY_US, server_secret="s" * 32)
    x_alice, x_bob = images(3, seed=1), images(2, seed=2)

    async def main() -> None:
        async with serving(settings) as (_, http):
            _, alice = await new_key(http)
            _, bob = await new_key(http)
            _, carol = await new_key(http)
            alone_alice = outputs_of(await ask(http, alice, model, x_alice, output), output)
            alone_bob = outputs_of(await ask(http, bob, model, x_bob, output), output)
            before = await model_stats(http, alice, model)
            answers = await asyncio.gather(
                ask(http, carol, model, x_alice, output),  # carol asks alice's images first...
                ask(http, bob, model, x_bob, output),
                ask(http, alice, model, x_alice, output),  # ...so alice's rows move within the batch
            )
            after = await model_stats(http, alice, model)
            assert after["execution_count"] == before["execution_count"] + 1  # one shared forward
            carol_batched, bob_batched, alice_batched = (outputs_of(r, output) for r in answers)
            np.testing.assert_allclose(alice_batched, alone_alice, rtol=0, atol=1e-5)
            np.testing.assert_allclose(bob_batched, alone_bob, rtol=0, atol=1e-5)
            assert np.abs(carol_batched - alice_batched).max() > 0.01  # carol's noise is her own

    asyncio.run(main())


@pytest.fixture
def stateful_store(model_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    write_defense_config(
        store / "enc",
        DefenseConfig(
            default=[{"name": "b4b", "n_bits": 8}],
            detector={"name": "prada", "delta": 0.9, "min_distances": 5, "action": "flag"},
        ),
    )
    return store


def test_detector_and_stateful_defense_state_is_per_key_when_batched(stateful_store: Path) -> None:
    """PRADA's and B4B's per-key state after batched requests equals the state the same requests
    build when each key asks alone: nothing of a batch-mate's images reaches a key's state."""
    settings = make_settings(stateful_store, None, batch_queue_delay_us=DELAY_US, server_secret="s" * 32)
    streams = [images(12, seed=5), images(9, seed=6)]

    async def state(http: httpx.AsyncClient, key_id: str) -> dict[str, Any]:
        response = await http.get(f"/admin/keys/{key_id}/defenses", headers=admin_headers())
        enc = response.json()["models"]["enc"]
        return {
            "distances": enc["prada"]["distances"],
            "w": round(enc["prada"]["w"], 6),
            "buckets": enc["b4b"]["occupied_buckets"],
        }

    async def main() -> None:
        async with serving(settings) as (_, http):
            batched = [await new_key(http) for _ in streams]
            for round_ in range(3):  # three rounds, the two keys' requests sharing each forward
                chunks = [np.array_split(s, 3)[round_] for s in streams]
                answers = await asyncio.gather(
                    *(ask(http, h, "enc", c, "embedding") for (_, h), c in zip(batched, chunks, strict=True))
                )
                assert [r.status_code for r in answers] == [200, 200]
            alone = [await new_key(http) for _ in streams]
            for (_, headers), stream in zip(alone, streams, strict=True):
                for chunk in np.array_split(stream, 3):
                    outputs_of(await ask(http, headers, "enc", chunk, "embedding"), "embedding")
            for (batched_id, _), (alone_id, _), stream in zip(batched, alone, streams, strict=True):
                mine = await state(http, batched_id)
                assert mine == await state(http, alone_id)
                assert mine["distances"] == len(stream) - 1

    asyncio.run(main())

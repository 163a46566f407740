"""Stateful defenses served by the API: B4B and PRADA state shared by two uvicorn workers on one real
Redis; PRADA's refuse / defend actions; MAD served; refused or rejected requests charge nothing."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from common.checkpoints import load_checkpoint
from common.wire import decode_infer_response, infer_request
from defenses.base import DefenseContext
from defenses.config import DefenseConfig, write_defense_config
from defenses.output.b4b import B4B, lsh_buckets
from server.app import create_app
from tests.conftest import admin_headers, create_key, error_of, make_settings, run_live_server

SECRET = "stateful-test-secret"
PRADA = {"name": "prada", "delta": 0.9, "min_distances": 30}


def attack_stream(n: int, seed: int = 0) -> np.ndarray:
    """Small perturbations of ten seed images (with a far jump every tenth): not natural queries."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 256, (10, 1, 28, 28)).astype(np.float64)
    x = seeds[rng.integers(0, 10, n)] + rng.normal(0, 2, (n, 1, 28, 28))
    x[::10] = rng.integers(0, 256, (len(x[::10]), 1, 28, 28))
    return x.clip(0, 255).astype(np.uint8)


def honest_stream(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@pytest.fixture
def stateful_store(model_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    write_defense_config(
        store / "enc",
        DefenseConfig(default=[{"name": "b4b", "n_bits": 8}], detector={**PRADA, "action": "refuse"}),
    )
    write_defense_config(
        store / "clf",
        DefenseConfig(
            default=[{"name": "mad", "epsilon": 0.3, "jacobian": "last_layer"}],
            detector={**PRADA, "action": "defend", "defend_with": [{"name": "label_only"}]},
        ),
    )
    return store


async def send_all(url: str, headers: dict[str, str], model: str, batches: list[np.ndarray]) -> list[int]:
    """Every batch as its own request on a fresh connection, eight at a time (both workers serve)."""
    gate = asyncio.Semaphore(8)
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(x: np.ndarray) -> int:
            body, extra = infer_request(
                x, ["embedding"] if model == "enc" else ["probabilities"], binary=True
            )
            async with gate:
                response = await client.post(
                    f"/v2/models/{model}/infer", content=body, headers={**headers, **extra}
                )
            return response.status_code

        return await asyncio.gather(*(one(x) for x in batches))


def local_buckets(store: Path, images: np.ndarray) -> set[int]:
    torch.set_num_threads(1)
    model, _ = load_checkpoint(store / "enc")
    with torch.inference_mode():
        e = model.features(torch.from_numpy(images).float() / 255)
    b4b = B4B(n_bits=8)
    planes = b4b.hyperplanes(DefenseContext("any", "enc", [], SECRET.encode()), e.shape[1])
    return set(lsh_buckets(e, planes))


def test_b4b_and_prada_state_is_shared_by_two_workers(stateful_store: Path, redis_url: str) -> None:
    honest = honest_stream(120)
    attack = attack_stream(200)
    with (
        run_live_server(stateful_store, redis_url, workers=2, STEALRANGE_SERVER_SECRET=SECRET) as url,
        httpx.Client(base_url=url) as admin,
    ):
        honest_id, honest_headers = create_key(admin, budget=10_000)
        codes = asyncio.run(send_all(url, honest_headers, "enc", list(np.split(honest, 24))))
        assert codes == [200] * 24
        state = admin.get(f"/admin/keys/{honest_id}/defenses", headers=admin_headers()).json()
        enc = state["models"]["enc"]
        # One sequence of queries across both workers: every image but the first gave a distance...
        assert enc["prada"]["distances"] == 119
        assert enc["prada"]["flag"] is None and enc["prada"]["w"] > 0.9
        # ...and the LSH coverage is the union of all buckets, wherever each request ran.
        assert enc["b4b"]["occupied_buckets"] == len(local_buckets(stateful_store, honest))

        thief_id, thief_headers = create_key(admin, budget=10_000)
        codes = asyncio.run(send_all(url, thief_headers, "enc", list(np.split(attack, 20))))
        assert codes[0] == 200
        usage = admin.get(f"/admin/keys/{thief_id}", headers=admin_headers()).json()
        served = codes.count(200)
        assert set(codes) <= {200, 403} and 403 in codes  # refused once flagged
        assert usage["used"] == served * 10  # refused requests were not charged
        flags = httpx.get(f"{url}/v1/usage", headers=thief_headers).json()["flags"]
        # The key is told it is flagged, not the statistics (W, delta) that would tell it how far
        # to back off; the admin API has them.
        assert flags["enc"]["flag"] == "extraction_suspected" and flags["enc"]["detector"] == "prada"
        assert set(flags["enc"]) == {"flag", "detector", "since"}
        admin_flags = admin.get(f"/admin/keys/{thief_id}/defenses", headers=admin_headers()).json()["flags"]
        assert admin_flags["enc"]["w"] < 0.9
        body, extra = infer_request(attack[:2], ["embedding"], binary=True)
        refused = httpx.post(f"{url}/v2/models/enc/infer", content=body, headers={**thief_headers, **extra})
        assert refused.status_code == 403 and error_of(refused)["code"] == "extraction_suspected"
        assert "W=" not in refused.text and "0.95" not in refused.text
        # The honest key is still served.
        assert asyncio.run(send_all(url, honest_headers, "enc", [honest[:5]])) == [200]


def ask(client: TestClient, headers: dict[str, str], x: np.ndarray) -> tuple[np.ndarray, Any]:
    body, extra = infer_request(x, ["probabilities"], binary=True)
    response = client.post("/v2/models/clf/infer", content=body, headers={**headers, **extra})
    assert response.status_code == 200, response.text
    values = decode_infer_response(response.content, response.headers.get("inference-header-content-length"))
    return values["probabilities"], response.headers


def test_mad_served_and_prada_defends_a_flagged_key(stateful_store: Path, backend: str | None) -> None:
    settings = make_settings(stateful_store, backend, expose_defense=True, server_secret=SECRET)
    plain = make_settings(stateful_store.parent / "plain", None)
    shutil.copytree(stateful_store, plain.model_store)
    for name in ("clf", "enc"):
        (plain.model_store / name / "defenses.json").unlink()
    x = honest_stream(6)
    with TestClient(create_app(plain)) as undefended:
        _, h = create_key(undefended)
        reference, _ = ask(undefended, h, x)
    with TestClient(create_app(settings)) as client:
        key_id, headers = create_key(client, budget=10_000)
        defended, response_headers = ask(client, headers, x)
        assert response_headers["x-stealrange-defense"].startswith("mad(")
        np.testing.assert_allclose(defended.sum(axis=1), 1.0, atol=1e-5)
        assert (np.abs(defended - reference).sum(axis=1) <= 0.3 + 1e-4).all()
        assert (np.abs(defended - reference).sum(axis=1) > 1e-3).all()
        # A malformed request to the defended model is rejected before any charge.
        bad = client.post(
            "/v2/models/clf/infer",
            json={"inputs": [{"name": "x", "shape": [1, 1, 27, 28], "datatype": "UINT8", "data": [0] * 756}]},
            headers=headers,
        )
        assert bad.status_code == 422
        assert client.get("/v1/usage", headers=headers).json()["used"] == 6
        # The attack stream gets the key flagged; from then on it is served label-only.
        for batch in np.split(attack_stream(200), 20):
            _, response_headers = ask(client, headers, batch)
        assert response_headers["x-stealrange-defense"] == "label_only()"
        probabilities, _ = ask(client, headers, x)
        np.testing.assert_array_equal(probabilities.max(axis=1), 1.0)
        state = client.get(f"/admin/keys/{key_id}/defenses", headers=admin_headers()).json()
        assert state["flags"]["clf"]["action"] == "defend"
        assert client.get("/v1/usage", headers=headers).json()["used"] == 6 + 200 + 6

"""Budgets stay exact across worker processes: two uvicorn workers on one real Redis."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from common.wire import infer_request
from tests.conftest import create_key, error_of, run_live_server

BATCH = 3
BUDGET = 997  # not a multiple of the batch size
REQUESTS = 400
CONCURRENCY = 200


def assert_budget_spent_exactly(
    responses: list[httpx.Response], usage: dict[str, Any], audit: list[dict[str, Any]]
) -> None:
    """The exactness of concurrent spending (one Redis or a cluster): every response served or
    refused ``budget_exhausted`` (no retry), exactly as many images charged as served and never
    above the budget, each served request charged and audited once."""
    statuses = collections.Counter(r.status_code for r in responses)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    unexpected = {r.status_code: r.text[:300] for r in responses if r.status_code not in (200, 429)}
    assert not unexpected, (statuses, unexpected)
    assert all(error_of(r)["code"] == "budget_exhausted" for r in refused)
    assert all(r.headers["x-should-retry"] == "false" for r in refused)
    assert usage["used"] == BATCH * len(served) == BATCH * (BUDGET // BATCH)
    assert usage["used"] <= BUDGET
    charges = [e for e in audit if e["event"] == "charge"]
    assert len(charges) == len(served) and sum(int(e["n"]) for e in charges) == usage["used"]
    assert len({e["request_id"] for e in charges}) == len(served)


async def hammer(url: str, headers: dict[str, str]) -> list[httpx.Response]:
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 1, 28, 28), dtype=np.uint8)
    body, wire_headers = infer_request(images, ["label"])
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one() -> httpx.Response:
            async with gate:
                return await client.post(
                    "/v2/models/clf/infer", content=body, headers={**headers, **wire_headers}
                )

        return await asyncio.gather(*(one() for _ in range(REQUESTS)))


def test_budget_exact_across_two_workers(model_store: Path, redis_url: str) -> None:
    with run_live_server(model_store, redis_url, workers=2) as url, httpx.Client(base_url=url) as admin:
        key_id, headers = create_key(admin, budget=BUDGET)
        responses = asyncio.run(hammer(url, headers))
        usage = admin.get("/v1/usage", headers=headers).json()
        audit = admin.get(
            f"/admin/keys/{key_id}/audit",
            params={"count": 2000},
            headers={"Authorization": "Bearer test-admin-token"},
        ).json()

    assert_budget_spent_exactly(responses, usage, audit)

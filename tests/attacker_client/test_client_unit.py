"""Unit tests of the SDK's errors, retries and budget tracking, with httpx mocked by respx."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest
import respx

from attacker_client import errors
from attacker_client.client import AsyncVictimClient, BaseVictimClient, Budget, VictimClient

URL = "http://victim.test"


def envelope(
    status: int, code: str, headers: dict[str, str] | None = None, rid: str = "req-1"
) -> httpx.Response:
    body = {"error": {"type": code, "code": code, "message": f"{code} happened"}}
    return httpx.Response(status, json=body, headers={"X-Request-ID": rid, **(headers or {})})


USAGE = {"key_id": "k", "budget": 10, "used": 1, "remaining": 9}


def sync_client(waits: list[float], **kwargs: Any) -> VictimClient:
    return VictimClient(URL, "sk-test", sleep=waits.append, **kwargs)


def async_client(waits: list[float], **kwargs: Any) -> AsyncVictimClient:
    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    return AsyncVictimClient(URL, "sk-test", sleep=sleep, **kwargs)


def call_usage(client: VictimClient | AsyncVictimClient) -> dict[str, Any]:
    """Run ``usage()`` on either client."""
    if isinstance(client, AsyncVictimClient):

        async def go() -> dict[str, Any]:
            async with client:
                return await client.usage()

        return asyncio.run(go())
    with client:
        return client.usage()


@pytest.fixture(params=["sync", "async"])
def make(request: pytest.FixtureRequest):
    return sync_client if request.param == "sync" else async_client


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_json", errors.InvalidInputError),
        (401, "invalid_api_key", errors.AuthenticationError),
        (403, "mode_not_allowed", errors.PermissionDeniedError),
        (404, "model_not_found", errors.NotFoundError),
        (413, "batch_too_large", errors.PayloadTooLargeError),
        (422, "invalid_shape", errors.InvalidInputError),
        (429, "budget_exhausted", errors.BudgetExhaustedError),
        (500, "internal_error", errors.ServerError),
    ],
)
@respx.mock
def test_typed_errors_carry_request_id(make, status: int, code: str, cls: type) -> None:
    waits: list[float] = []
    route = respx.get(f"{URL}/v1/usage").mock(return_value=envelope(status, code, rid=f"rid-{status}"))
    with pytest.raises(cls) as info:
        call_usage(make(waits, max_retries=0))
    err = info.value
    assert isinstance(err, errors.VictimAPIError)
    assert (err.status_code, err.code, err.request_id) == (status, code, f"rid-{status}")
    assert err.message == f"{code} happened"
    assert route.call_count == 1
    assert route.calls[0].request.headers["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize(
    "body",
    [
        {"error": "model 'x' not found", "code": "model_not_found", "type": "not_found"},  # KServe v2
        {
            "error": {
                "message": "model 'x' not found",
                "type": "not_found",
                "param": None,
                "code": "model_not_found",
            }
        },
    ],
)
def test_both_error_shapes_parse(body: dict[str, Any]) -> None:
    response = httpx.Response(404, json=body, headers={"X-Request-ID": "r"})
    err = errors.error_from_response(response)
    assert isinstance(err, errors.NotFoundError)
    assert (err.code, err.message, err.request_id) == ("model_not_found", "model 'x' not found", "r")


@respx.mock
def test_retry_on_429_honours_retry_after_ms_then_retry_after(make) -> None:
    waits: list[float] = []
    limited = {"x-should-retry": "true"}
    route = respx.get(f"{URL}/v1/usage").mock(
        side_effect=[
            envelope(429, "rate_limited", {**limited, "Retry-After": "1", "retry-after-ms": "250"}),
            envelope(429, "rate_limited", {**limited, "Retry-After": "2"}),
            httpx.Response(200, json=USAGE),
        ]
    )
    assert call_usage(make(waits, max_retries=2)) == USAGE
    assert route.call_count == 3
    assert waits == [0.25, 2.0]


@respx.mock
def test_rate_limit_error_after_retries_exhausted(make) -> None:
    waits: list[float] = []
    headers = {"Retry-After": "1", "retry-after-ms": "700", "x-should-retry": "true"}
    route = respx.get(f"{URL}/v1/usage").mock(return_value=envelope(429, "rate_limited", headers))
    with pytest.raises(errors.RateLimitError) as info:
        call_usage(make(waits, max_retries=1))
    assert info.value.retry_after == pytest.approx(0.7)
    assert route.call_count == 2 and waits == [0.7]


@respx.mock
def test_no_retry_on_budget_exhausted(make) -> None:
    waits: list[float] = []
    # Even without x-should-retry the status-based default never retries budget_exhausted.
    route = respx.get(f"{URL}/v1/usage").mock(return_value=envelope(429, "budget_exhausted"))
    with pytest.raises(errors.BudgetExhaustedError):
        call_usage(make(waits, max_retries=3))
    assert route.call_count == 1 and waits == []


@respx.mock
def test_should_retry_false_stops_a_503_and_true_retries_a_400(make) -> None:
    waits: list[float] = []
    route = respx.get(f"{URL}/v1/usage").mock(
        return_value=envelope(503, "unavailable", {"x-should-retry": "false"})
    )
    with pytest.raises(errors.ServerError):
        call_usage(make(waits, max_retries=3))
    assert route.call_count == 1 and waits == []

    route.mock(side_effect=[envelope(400, "x", {"x-should-retry": "true"}), httpx.Response(200, json=USAGE)])
    assert call_usage(make(waits, max_retries=3)) == USAGE


@respx.mock
def test_5xx_retried_with_exponential_backoff(make) -> None:
    waits: list[float] = []
    route = respx.get(f"{URL}/v1/usage").mock(return_value=envelope(502, "bad_gateway"))
    with pytest.raises(errors.ServerError):
        call_usage(make(waits, max_retries=2))
    assert route.call_count == 3
    assert 0.375 <= waits[0] <= 0.5 and 0.75 <= waits[1] <= 1.0


@respx.mock
def test_connection_error_retried_then_raised(make) -> None:
    waits: list[float] = []
    route = respx.get(f"{URL}/v1/usage").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(errors.APIConnectionError) as info:
        call_usage(make(waits, max_retries=2))
    assert info.value.status_code is None
    assert route.call_count == 3 and len(waits) == 2

    route.mock(side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json=USAGE)])
    assert call_usage(make(waits, max_retries=1)) == USAGE


@respx.mock
def test_budget_tracking_from_headers(make) -> None:
    waits: list[float] = []
    headers = {
        "X-Budget-Limit": "100",
        "X-Budget-Used": "40",
        "X-Budget-Remaining": "60",
        "RateLimit-Remaining": "7",
    }
    respx.get(f"{URL}/v1/usage").mock(return_value=httpx.Response(200, json=USAGE, headers=headers))
    client = make(waits)
    assert client.last_budget is None
    call_usage(client)
    assert client.last_budget == Budget(limit=100, used=40, remaining=60, rate_limit_remaining=7)


def test_retry_delay_policy() -> None:
    assert BaseVictimClient.retry_delay(0, httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    assert BaseVictimClient.retry_delay(0, httpx.Headers({"Retry-After": "3"})) == 3.0
    # absurd server waits fall back to the capped backoff
    assert BaseVictimClient.retry_delay(10, httpx.Headers({"Retry-After": "3600"})) <= 8.0
    assert all(6.0 <= BaseVictimClient.retry_delay(20) <= 8.0 for _ in range(20))


@respx.mock
def test_predict_chunks_to_max_batch(make) -> None:
    """Chunking and ordering with a mocked server echoing each image's first pixel as its label."""
    from common.wire import pack_binary, split_binary, take_binary

    respx.get(f"{URL}/v2/models/clf").mock(return_value=httpx.Response(200, json={"max_batch": 3}))

    def infer(request: httpx.Request) -> httpx.Response:
        header, blob = split_binary(request.content, int(request.headers["inference-header-content-length"]))
        (images,) = take_binary(header["inputs"], blob)
        assert images is not None
        labels = images[:, 0, 0, 0].astype(np.int64)
        entry = {"name": "label", "shape": [len(labels)], "datatype": "INT64"}
        entry["parameters"] = {"binary_data_size": labels.nbytes}
        body, length = pack_binary({"outputs": [entry]}, [labels])
        return httpx.Response(200, content=body, headers={"Inference-Header-Content-Length": str(length)})

    route = respx.post(f"{URL}/v2/models/clf/infer").mock(side_effect=infer)
    images = np.zeros((7, 1, 2, 2), np.uint8)
    images[:, 0, 0, 0] = np.arange(7)
    waits: list[float] = []
    client = make(waits)
    if isinstance(client, AsyncVictimClient):

        async def go() -> np.ndarray:
            async with client:
                return await client.predict("clf", images, mode="label")

        labels = asyncio.run(go())
    else:
        with client:
            labels = client.predict("clf", images, mode="label")
    assert labels.tolist() == list(range(7))
    assert route.call_count == 3

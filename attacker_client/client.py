"""The httpx SDK of the victim API: :class:`VictimClient` (sync) and :class:`AsyncVictimClient`.

Both share :class:`BaseVictimClient`: URL, key, headers, the retry policy, budget tracking, request
building and decoding, chunking and the response cache. Only the transport (``httpx.Client`` or
``httpx.AsyncClient``) and the sleeping differ.

Retry policy (as anthropic-sdk-python): ``max_retries`` (default 2) retries of connection errors,
timeouts, 408, 409, 429 ``rate_limited`` and 5xx; never of ``budget_exhausted``. A response's
``x-should-retry: true|false`` overrides that default. The wait honours ``retry-after-ms`` then
``Retry-After`` (up to 60 s); otherwise exponential backoff 0.5 s * 2^attempt capped at 8 s, with
up to 25 % jitter taken off.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import httpx
import numpy as np

from attacker_client.cache import ResponseCache, entry_key
from attacker_client.errors import (
    APIConnectionError,
    VictimAPIError,
    error_from_response,
    retry_after_seconds,
)
from common.progress import make_progress, progress_enabled
from common.wire import decode_infer_response, infer_request

PredictMode = Literal["probabilities", "logits", "label", "top_k"]
PredictTransport = Literal["binary", "json"]
EmbedTransport = Literal["binary", "json", "openai"]
PredictResult = np.ndarray | tuple[np.ndarray, np.ndarray]

INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0
RETRY_STATUSES = frozenset({408, 409, 429})

_OUTPUTS: dict[str, list[str]] = {
    "probabilities": ["probabilities"],
    "logits": ["logits"],
    "label": ["label"],
    "top_k": ["top_k_indices", "top_k_probabilities"],
    "embedding": ["embedding"],
}


@dataclass(frozen=True)
class Budget:
    """The key's budget as the last response's headers told it (``X-Budget-*``, ``RateLimit-*``)."""

    limit: int
    used: int
    remaining: int
    rate_limit_remaining: int | None = None


@dataclass
class _Call:
    """One HTTP request to make: method, path, and either a JSON body or raw content + headers."""

    method: str
    path: str
    content: bytes | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Plan:
    """A batched query: cache keys per image, cached rows, and the chunks of images still to ask."""

    n: int
    keys: list[str]
    cached: dict[str, dict[str, np.ndarray]]
    chunks: list[np.ndarray]  # indices into the batch, one array per request
    fresh: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # answered rows by index

    @property
    def to_ask(self) -> int:
        """Images that will be sent (and charged): the batch minus cache hits and repeats."""
        return sum(len(chunk) for chunk in self.chunks)


class BaseVictimClient:
    """Shared logic of the sync and async clients; not used directly."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        cache: ResponseCache | str | Path | None = None,
        headers: dict[str, str] | None = None,
        progress: bool | None = None,
        cache_namespace: str | None = None,
    ) -> None:
        """``cache``: a :class:`ResponseCache` or a path to open one at; None disables caching.
        ``cache_namespace``: what cache entries are keyed by besides model and image (default: the
        server URL; a stable name lets a cache survive the server moving to another port).
        ``progress``: draw a bar over the images of a multi-request query (``None``: on a terminal,
        unless ``STEALRANGE_NO_PROGRESS`` is set)."""
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.cache = ResponseCache(cache) if isinstance(cache, str | Path) else cache
        self.cache_namespace = cache_namespace or self.base_url
        self._owns_cache = isinstance(cache, str | Path)
        self.extra_headers = dict(headers or {})
        self.progress = progress
        self.images_sent = 0  # images answered by the server through this client (cache hits excluded)
        self.last_budget: Budget | None = None
        self._metadata: dict[str, dict[str, Any]] = {}

    # -- headers and policy ------------------------------------------------------------------

    def default_headers(self) -> dict[str, str]:
        """Headers sent on every request: the bearer key, then the caller's extra headers."""
        return {"Authorization": f"Bearer {self.api_key}", **self.extra_headers}

    @staticmethod
    def should_retry(response: httpx.Response) -> bool:
        """Whether an error response is worth retrying; ``x-should-retry`` overrides the status."""
        override = response.headers.get("x-should-retry", "").strip().lower()
        if override in ("true", "false"):
            return override == "true"
        status = response.status_code
        if status == 429:
            return error_from_response(response).code != "budget_exhausted"
        return status in RETRY_STATUSES or status >= 500

    @staticmethod
    def retry_delay(attempt: int, headers: httpx.Headers | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        if headers is not None:
            wanted = retry_after_seconds(headers)
            if wanted is not None and wanted <= MAX_RETRY_AFTER:
                return wanted
        delay = min(INITIAL_RETRY_DELAY * 2.0**attempt, MAX_RETRY_DELAY)
        return delay * (1.0 - 0.25 * random.random())

    def _record_budget(self, headers: httpx.Headers) -> None:
        """Update :attr:`last_budget` from a response's budget and rate-limit headers."""
        try:
            limit = int(headers["x-budget-limit"])
            used = int(headers["x-budget-used"])
            remaining = int(headers["x-budget-remaining"])
        except (KeyError, ValueError):
            return
        rate = headers.get("ratelimit-remaining") or headers.get("x-ratelimit-remaining")
        self.last_budget = Budget(limit, used, remaining, int(rate) if rate and rate.isdigit() else None)

    @contextlib.contextmanager
    def _query_progress(self, plan: _Plan, model: str) -> Iterator[Callable[[int], None]]:
        """A bar over the images to ask (shown when the query takes more than one request);
        yields ``advance(n_images)``."""
        show = len(plan.chunks) > 1 and (progress_enabled() if self.progress is None else self.progress)
        with make_progress(show) as bar:
            hits = plan.n - plan.to_ask
            task = bar.add_task(f"query {model}", total=plan.to_ask, status=f"{hits} cached")
            yield lambda n: bar.update(task, advance=n)

    # -- request building and decoding -------------------------------------------------------

    @staticmethod
    def _check_images(images: np.ndarray) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.ndim != 4:
            raise ValueError("images must be a numpy array [n, C, H, W]")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
        return np.ascontiguousarray(images)

    @staticmethod
    def _mode_key(mode: str, top_k: int) -> str:
        if mode not in _OUTPUTS:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(_OUTPUTS)}")
        return f"top_k={top_k}" if mode == "top_k" else mode

    def _infer_call(self, model: str, images: np.ndarray, mode: str, top_k: int, transport: str) -> _Call:
        if transport == "openai":
            body = {
                "model": model,
                "input": [base64.b64encode(image.tobytes()).decode() for image in images],
                "input_type": "tensor",
                "encoding_format": "base64",
            }
            return _Call("POST", "/v1/embeddings", json=body)
        if transport not in ("binary", "json"):
            raise ValueError(f"unknown transport {transport!r}")
        parameters = {"top_k": top_k} if mode == "top_k" else None
        content, headers = infer_request(images, _OUTPUTS[mode], transport == "binary", parameters)
        return _Call("POST", f"/v2/models/{model}/infer", content=content, headers=headers)

    @staticmethod
    def _decode(response: httpx.Response, transport: str) -> dict[str, np.ndarray]:
        if transport == "openai":
            items = sorted(response.json()["data"], key=lambda item: item["index"])
            rows = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in items]
            return {"embedding": np.stack(rows).astype(np.float32)}
        return decode_infer_response(
            response.content, response.headers.get("inference-header-content-length")
        )

    def _plan(self, model: str, images: np.ndarray, mode_key: str, max_batch: int) -> _Plan:
        """Cache look-up, then the uncached images split into chunks of at most ``max_batch``."""
        n = len(images)
        if self.cache is not None:
            keys = [entry_key(self.cache_namespace, model, mode_key, image) for image in images]
            cached = self.cache.get_many(keys)
        else:
            keys, cached = [], {}
        missing: list[int] = []
        seen: set[str] = set()
        for i in range(n):
            if keys and (keys[i] in cached or keys[i] in seen):
                continue  # cached, or a repeat of an image already in this batch: asked once
            if keys:
                seen.add(keys[i])
            missing.append(i)
        index = np.asarray(missing, dtype=np.int64)
        chunks = [index[s : s + max_batch] for s in range(0, len(index), max(1, max_batch))]
        return _Plan(n, keys, cached, chunks)

    def _store(self, plan: _Plan, index: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Keep one answered chunk: in the plan and, at once, in the on-disk cache, so that what was
        paid for survives a later chunk's failure (an exhausted budget, a dropped connection)."""
        rows = {int(i): {name: array[j] for name, array in outputs.items()} for j, i in enumerate(index)}
        plan.fresh.update(rows)
        self.images_sent += len(rows)
        if self.cache is not None and rows:
            entries = {plan.keys[i]: row for i, row in rows.items()}
            self.cache.put_many(entries)
            plan.cached.update(entries)

    @staticmethod
    def _assemble(plan: _Plan) -> dict[str, np.ndarray]:
        """Merge cached rows and fresh results back into batch order."""
        rows = [plan.fresh[i] if i in plan.fresh else plan.cached[plan.keys[i]] for i in range(plan.n)]
        if not rows:
            return {}
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

    @staticmethod
    def _predict_result(outputs: dict[str, np.ndarray], mode: str, n: int) -> PredictResult:
        if mode == "top_k":
            if n == 0:
                return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
            return outputs["top_k_indices"], outputs["top_k_probabilities"]
        if n == 0:
            return np.zeros((0,), np.int64) if mode == "label" else np.zeros((0, 0), np.float32)
        return outputs[mode]

    def _max_batch_of(self, metadata: dict[str, Any]) -> int:
        return max(1, int(metadata.get("max_batch") or 1))


class VictimClient(BaseVictimClient):
    """Synchronous client over ``httpx.Client``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        **kwargs: Any,
    ) -> None:
        """``http_client``: bring your own (its base URL is ignored); ``sleep``: waits between retries."""
        super().__init__(base_url, api_key, **kwargs)
        self._http = http_client or httpx.Client(timeout=self.timeout)
        self._sleep = sleep

    def _request(self, call: _Call) -> httpx.Response:
        """Send ``call`` with retries; returns a 2xx response or raises a typed error."""
        headers = {**self.default_headers(), **call.headers}
        url = self.base_url + call.path
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(
                    call.method, url, content=call.content, json=call.json, headers=headers
                )
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
                self._sleep(self.retry_delay(attempt))
                continue
            self._record_budget(response.headers)
            if response.is_success:
                return response
            if attempt >= self.max_retries or not self.should_retry(response):
                raise error_from_response(response)
            self._sleep(self.retry_delay(attempt, response.headers))
        raise AssertionError("unreachable")

    def list_models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the models this key may query (``id``, ``kind``)."""
        return self._request(_Call("GET", "/v1/models")).json()["data"]

    def model_metadata(self, name: str) -> dict[str, Any]:
        """``GET /v2/models/{name}``: input shape, outputs, classes, modes, ``max_batch``; cached."""
        if name not in self._metadata:
            self._metadata[name] = self._request(_Call("GET", f"/v2/models/{name}")).json()
        return self._metadata[name]

    def usage(self) -> dict[str, Any]:
        """``GET /v1/usage``: the key's budget, used, remaining and rate policy."""
        return self._request(_Call("GET", "/v1/usage")).json()

    def _batched(
        self, model: str, images: np.ndarray, mode: str, top_k: int, transport: str
    ) -> dict[str, np.ndarray]:
        images = self._check_images(images)
        max_batch = self._max_batch_of(self.model_metadata(model))
        plan = self._plan(model, images, self._mode_key(mode, top_k), max_batch)
        with self._query_progress(plan, model) as advance:
            for index in plan.chunks:
                response = self._request(self._infer_call(model, images[index], mode, top_k, transport))
                self._store(plan, index, self._decode(response, transport))
                advance(len(index))
        return self._assemble(plan)

    def predict(
        self,
        model: str,
        images: np.ndarray,
        mode: PredictMode = "probabilities",
        top_k: int = 5,
        transport: PredictTransport = "binary",
    ) -> PredictResult:
        """Classifier outputs for uint8 images [n, C, H, W]: [n, classes], labels [n], or for
        ``top_k`` a tuple (indices [n, k], probabilities [n, k]). Chunked to the server's max batch."""
        if mode == "embedding":
            raise ValueError("use embed() for encoders")
        outputs = self._batched(model, images, mode, top_k, transport)
        return self._predict_result(outputs, mode, len(images))

    def embed(self, model: str, images: np.ndarray, transport: EmbedTransport = "binary") -> np.ndarray:
        """Encoder embeddings float32 [n, d] for uint8 images [n, C, H, W], chunked to the max batch."""
        outputs = self._batched(model, images, "embedding", 1, transport)
        return outputs.get("embedding", np.zeros((0, 0), np.float32)).astype(np.float32, copy=False)

    def close(self) -> None:
        """Close the HTTP connections and a cache this client opened."""
        self._http.close()
        if self._owns_cache and self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Self:
        """Use as ``with VictimClient(...) as client``."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close on leaving the block."""
        self.close()


class AsyncVictimClient(BaseVictimClient):
    """Asynchronous client over ``httpx.AsyncClient``; chunks of a batch run concurrently, at most
    ``max_concurrency`` requests at once (a semaphore shared by every call of this client)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_concurrency: int = 4,
        http_client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        **kwargs: Any,
    ) -> None:
        """``max_concurrency``: most requests in flight; ``sleep``: awaited between retries."""
        super().__init__(base_url, api_key, **kwargs)
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.max_concurrency = max_concurrency
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)
        self._sleep = sleep
        self._gate = asyncio.Semaphore(max_concurrency)

    async def _request(self, call: _Call) -> httpx.Response:
        """Send ``call`` with retries (inside the concurrency gate); 2xx or a typed error."""
        headers = {**self.default_headers(), **call.headers}
        url = self.base_url + call.path
        for attempt in range(self.max_retries + 1):
            try:
                async with self._gate:
                    response = await self._http.request(
                        call.method, url, content=call.content, json=call.json, headers=headers
                    )
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
                await self._sleep(self.retry_delay(attempt))
                continue
            self._record_budget(response.headers)
            if response.is_success:
                return response
            if attempt >= self.max_retries or not self.should_retry(response):
                raise error_from_response(response)
            await self._sleep(self.retry_delay(attempt, response.headers))
        raise AssertionError("unreachable")

    async def list_models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the models this key may query (``id``, ``kind``)."""
        return (await self._request(_Call("GET", "/v1/models"))).json()["data"]

    async def model_metadata(self, name: str) -> dict[str, Any]:
        """``GET /v2/models/{name}``: input shape, outputs, classes, modes, ``max_batch``; cached."""
        if name not in self._metadata:
            self._metadata[name] = (await self._request(_Call("GET", f"/v2/models/{name}"))).json()
        return self._metadata[name]

    async def usage(self) -> dict[str, Any]:
        """``GET /v1/usage``: the key's budget, used, remaining and rate policy."""
        return (await self._request(_Call("GET", "/v1/usage"))).json()

    async def _batched(
        self, model: str, images: np.ndarray, mode: str, top_k: int, transport: str
    ) -> dict[str, np.ndarray]:
        images = self._check_images(images)
        max_batch = self._max_batch_of(await self.model_metadata(model))
        plan = self._plan(model, images, self._mode_key(mode, top_k), max_batch)

        with self._query_progress(plan, model) as advance:

            async def one(index: np.ndarray) -> None:
                call = self._infer_call(model, images[index], mode, top_k, transport)
                self._store(plan, index, self._decode(await self._request(call), transport))
                advance(len(index))

            # Every chunk runs to its end before an error is raised, so each answered one is kept.
            outcomes = await asyncio.gather(*(one(index) for index in plan.chunks), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return self._assemble(plan)

    async def predict(
        self,
        model: str,
        images: np.ndarray,
        mode: PredictMode = "probabilities",
        top_k: int = 5,
        transport: PredictTransport = "binary",
    ) -> PredictResult:
        """As :meth:`VictimClient.predict`, the chunks sent concurrently."""
        if mode == "embedding":
            raise ValueError("use embed() for encoders")
        outputs = await self._batched(model, images, mode, top_k, transport)
        return self._predict_result(outputs, mode, len(images))

    async def embed(self, model: str, images: np.ndarray, transport: EmbedTransport = "binary") -> np.ndarray:
        """As :meth:`VictimClient.embed`, the chunks sent concurrently."""
        outputs = await self._batched(model, images, "embedding", 1, transport)
        return outputs.get("embedding", np.zeros((0, 0), np.float32)).astype(np.float32, copy=False)

    async def close(self) -> None:
        """Close the HTTP connections and a cache this client opened."""
        await self._http.aclose()
        if self._owns_cache and self.cache is not None:
            self.cache.close()

    async def __aenter__(self) -> Self:
        """Use as ``async with AsyncVictimClient(...) as client``."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close on leaving the block."""
        await self.close()


__all__ = [
    "AsyncVictimClient",
    "BaseVictimClient",
    "Budget",
    "VictimAPIError",
    "VictimClient",
]

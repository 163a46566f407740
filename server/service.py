"""The inference service: one object, built in ``create_app``, that every inference route calls.

A request goes: the key (a dependency, before any body is read) -> the model, 404 unless this key
may query it -> the body, decoded and validated in a worker thread into one :class:`Batch` ->
the charge -> the model's batcher (:mod:`server.batching`): the request joins the next forward of
its model on the model's long-lived inference thread, possibly with other requests, and its own
defenses run there on its own rows -> the outputs. Everything that can reject a request happens
before the charge, so a rejected request charges nothing; a failure after the charge (its batch's
forward, or its own defenses) is refunded, for that request alone. CPU work (JSON parsing, image
decoding, tensor checks, the model) never runs on the event loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
import torch
from pydantic import ValidationError

from common.wire import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    WireError,
    datatype_of,
    element_count,
    pack_binary,
    split_binary,
    take_binary,
    tensor_from_json,
)
from defenses.base import DefenseContext, DefensePipeline, image_digests
from defenses.state import DefenseStore
from server.accounting import Accounting, ChargeResult, ChargeStatus, rate_limit_headers
from server.batching import InferenceWorker, ModelBatcher, RawOutputs, policy_for
from server.errors import (
    AuthenticationError,
    BudgetExhaustedError,
    InvalidInputError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from server.images import decode_batch
from server.keys import KeyRecord
from server.registry import OUTPUT_MODES, ModelRegistry, ServedModel
from server.schemas import EmbeddingsRequest, InferRequest
from server.secrets import ServerSecrets
from server.settings import ServerSettings
from server.stats import ModelStats, RequestTimes

logger = logging.getLogger("stealrange.server")

ACCEPTED_DATATYPES = ("UINT8", "FP32")
UNMETERED_HEADER = "x-stealrange-unmetered"
T = TypeVar("T")


@dataclass(frozen=True)
class RequestIds:
    """The server's id of a request (audit events, ``X-Request-ID``) and the client's own, if any."""

    request_id: str
    client_request_id: str = ""


@dataclass
class Batch:
    """One validated request: its images, what to answer, and the digests keyed noise uses. The
    images become the model's input on the inference thread, in their forward's batch."""

    images: np.ndarray  # uint8 or float32 [n, C, H, W], as sent, checked against the card
    outputs: list[str]
    top_k: int
    digests: list[bytes]

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


class InferenceService:
    """Validation, accounting, defenses and the model behind every inference route."""

    def __init__(
        self,
        settings: ServerSettings,
        registry: ModelRegistry,
        accounting: Accounting,
        defense_store: DefenseStore,
        secrets: ServerSecrets,
        stats: ModelStats,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.accounting = accounting
        self.defense_store = defense_store
        self.secrets = secrets
        self.stats = stats
        self.input_limiter = anyio.CapacityLimiter(settings.inference_threads)
        unknown = sorted(set(settings.model_batching) - set(registry.models))
        if unknown:
            raise ValueError(f"model_batching names models that are not served: {', '.join(unknown)}")
        # Unset torch_threads: what torch uses on the thread that builds the app.
        threads = settings.torch_threads or torch.get_num_threads()
        names = registry.names()
        self.workers = [
            InferenceWorker(f"stealrange-inference-{i}", threads)
            for i in range(max(1, min(settings.inference_threads, len(names))))
        ]
        self.batchers = {
            name: ModelBatcher(
                registry.models[name], policy_for(settings, name), self.workers[i % len(self.workers)], stats
            )
            for i, name in enumerate(names)
        }

    def start(self) -> None:
        """Start the inference threads (the app's lifespan; a request would start them too)."""
        for worker in self.workers:
            worker.start()

    async def stop(self) -> None:
        """Let the inference threads finish what is queued, and end them (the app's lifespan)."""
        for worker in self.workers:
            await anyio.to_thread.run_sync(worker.stop)

    # ------------------------------------------------------------------------------ what a key may see

    def model_for(self, name: str, key: KeyRecord) -> ServedModel:
        """The model ``name``, or the same 404 whether it does not exist or this key may not query it."""
        if name not in self.registry.models or not key.allows_model(name):
            raise NotFoundError(f"model {name!r} not found", code="model_not_found")
        return self.registry.models[name]

    def visible_models(self, key: KeyRecord) -> list[ServedModel]:
        """The models this key may query, by name."""
        return [self.registry.models[n] for n in self.registry.names() if key.allows_model(n)]

    @staticmethod
    def check_outputs(served: ServedModel, key: KeyRecord, requested: list[str] | None) -> list[str]:
        """The outputs to compute: the requested ones if the key's tier allows them all, else a 403."""
        allowed = served.outputs_for_tier(key.tier)
        if requested is None:
            outputs = served.default_outputs(key.tier)
            if not outputs:
                raise PermissionDeniedError(
                    f"tier {key.tier!r} may not query {served.name!r}", code="mode_not_allowed"
                )
            return outputs
        unknown = [name for name in requested if name not in served.output_names]
        if unknown:
            raise InvalidInputError(
                f"unknown output {unknown[0]!r}; model {served.name} has {', '.join(served.output_names)}",
                code="unknown_output",
            )
        denied = [name for name in requested if name not in allowed]
        if denied:
            raise PermissionDeniedError(
                f"tier {key.tier!r} may not receive {OUTPUT_MODES[denied[0]]!r} outputs of {served.name!r}; "
                f"allowed: {', '.join(allowed) or 'none'}",
                code="mode_not_allowed",
            )
        return list(dict.fromkeys(requested))

    def check_batch_size(self, n: int) -> None:
        """At least one image, at most ``max_batch``."""
        if n < 1:
            raise InvalidInputError("a request needs at least one image", code="empty_batch")
        if n > self.settings.max_batch:
            raise PayloadTooLargeError(
                f"batch of {n} images is over the limit of {self.settings.max_batch}", code="batch_too_large"
            )

    # ----------------------------------------------------------------------- wire formats -> one Batch

    async def cpu(self, fn: Callable[..., T], *args: Any, work_bytes: int | None = None) -> T:
        """Run CPU work on a request's data (parsing, decoding, checks, encoding the answer) in a
        worker thread, off the event loop; or, when ``work_bytes`` (the bytes the work is linear
        in) is at most ``settings.inline_cpu_bytes``, right here: a 1-image KServe body parses in
        tens of microseconds, less than the hop (a thread wake-up and two GIL handoffs, measured in
        docs/serving.md). Work of no stated size (image decoding, whose cost a small body does not
        bound) always hops. The forward never hops per request (:mod:`server.batching`)."""
        if work_bytes is not None and work_bytes <= self.settings.inline_cpu_bytes:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.input_limiter)

    async def kserve_batch(
        self, served: ServedModel, key: KeyRecord, body: bytes, header_length: str | None
    ) -> tuple[InferRequest, Batch]:
        """A KServe v2 infer body (JSON, or Triton's binary extension) -> the request and its batch."""
        if header_length is None and len(body) > self.settings.max_json_tensor_bytes:
            raise PayloadTooLargeError(
                f"a JSON inference body is limited to {self.settings.max_json_tensor_bytes} bytes; "
                "send larger batches with the binary tensor extension",
                code="payload_too_large",
            )
        return await self.cpu(self._kserve_batch, served, key, body, header_length, work_bytes=len(body))

    def _kserve_batch(
        self, served: ServedModel, key: KeyRecord, body: bytes, header_length: str | None
    ) -> tuple[InferRequest, Batch]:
        request, blob = _parse_infer_body(body, header_length)
        tensor = request.inputs[0]
        expected = ", ".join(map(str, served.card.input.shape))
        if len(tensor.shape) != 4:
            raise InvalidInputError(
                f"input shape {tensor.shape} must be [n, {expected}]", code="invalid_shape"
            )
        self.check_batch_size(tensor.shape[0])
        if tensor.datatype not in ACCEPTED_DATATYPES:
            raise InvalidInputError(
                f"datatype {tensor.datatype} not accepted; send {' or '.join(ACCEPTED_DATATYPES)}",
                code="invalid_dtype",
            )
        if tuple(tensor.shape[1:]) != served.card.input.shape:
            raise InvalidInputError(
                f"input shape {tensor.shape} does not match [n, {expected}]", code="invalid_shape"
            )
        requested = [o.name for o in request.outputs] if request.outputs else None
        outputs = self.check_outputs(served, key, requested)
        top_k = request.parameters.get("top_k", 5) if served.card.kind == "classifier" else 1
        if (
            not isinstance(top_k, int)
            or isinstance(top_k, bool)
            or not 1 <= top_k <= max(1, served.card.num_classes)
        ):
            raise InvalidInputError(
                f"parameters.top_k must be an integer in [1, {served.card.num_classes}]",
                code="invalid_top_k",
            )
        try:
            entry = {"name": tensor.name, "shape": tensor.shape, "datatype": tensor.datatype}
            (binary,) = take_binary([{**entry, "parameters": tensor.parameters}], blob)
            if binary is not None:
                images = binary
            else:
                data = tensor.data if tensor.data is not None else []
                count = element_count(tensor.shape)
                # The element count is checked before any copy of a flat list (nested lists, which
                # the protocol allows, are counted after flattening).
                if data and not isinstance(data[0], list) and len(data) != count:
                    raise WireError(f"shape {tensor.shape} needs {count} values, got {len(data)}")
                images = tensor_from_json(data, tensor.datatype, tensor.shape)
        except (WireError, ValueError, OverflowError) as exc:
            raise InvalidInputError(f"invalid tensor: {exc}", code="invalid_tensor") from None
        return request, self._batch(served, images, outputs, top_k)

    async def embeddings_batch(
        self, key: KeyRecord, body: bytes
    ) -> tuple[EmbeddingsRequest, ServedModel, Batch]:
        """An OpenAI-style embeddings body -> the request, its model and its batch (in a thread)."""
        return await self.cpu(self._embeddings_batch, key, body)

    def _embeddings_batch(self, key: KeyRecord, body: bytes) -> tuple[EmbeddingsRequest, ServedModel, Batch]:
        try:
            request = EmbeddingsRequest.model_validate_json(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            if err["type"] == "json_invalid":
                raise InvalidRequestError("the body is not valid JSON", code="invalid_json") from None
            where = ".".join(str(p) for p in err["loc"])
            raise InvalidInputError(f"{where}: {err['msg']}", code="invalid_input", param=where) from None
        served = self.model_for(request.model, key)
        if served.card.kind != "encoder":
            raise InvalidInputError(
                f"model {served.name!r} is a {served.card.kind}, not an encoder", code="not_an_encoder"
            )
        outputs = self.check_outputs(served, key, ["embedding"])
        items = [request.input] if isinstance(request.input, str) else request.input
        self.check_batch_size(len(items))
        s = self.settings
        images = decode_batch(
            items,
            request.input_type,
            served.card.input,
            s.image_formats,
            s.max_image_bytes,
            s.max_image_pixels,
        )
        return request, served, self._batch(served, images, outputs, 1)

    @staticmethod
    def _batch(served: ServedModel, images: np.ndarray, outputs: list[str], top_k: int) -> Batch:
        check_images(served, images)
        return Batch(images=images, outputs=outputs, top_k=top_k, digests=image_digests(images))

    # -------------------------------------------------------------------------------- charge and run

    async def infer(
        self, served: ServedModel, key: KeyRecord, batch: Batch, ids: RequestIds
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Charge ``batch.n`` queries, run the model behind the key's defenses, refund if it fails;
        returns the outputs and the response headers (rate limit, budget).

        The defenses' noise is keyed by (server secret, key, model, image digest). A key the model's
        detector flagged is refused (403 ``extraction_suspected``, before any charge) or served
        through the detector's stronger pipeline. With accounting disabled (benchmarks only) nothing
        is charged and every answer says so in ``x-stealrange-unmetered: true``.
        """
        pipeline = await self._pipeline(served, key)
        mode = ",".join(sorted({OUTPUT_MODES[o] for o in batch.outputs}))
        headers = {"x-stealrange-defense": repr(pipeline)} if self.settings.expose_defense else {}
        if not self.settings.accounting_enabled:
            values = await self._run(served, key, batch, pipeline, RequestTimes(images=batch.n))
            return values, {**headers, UNMETERED_HEADER: "true"}
        result = await self.accounting.charge(
            key.key_id, batch.n, served.name, mode, ids.request_id, ids.client_request_id
        )
        headers.update(self._refuse_unless_charged(result, key, batch.n))
        times = RequestTimes(images=batch.n)
        try:
            values = await self._run(served, key, batch, pipeline, times)
        except Exception as exc:
            await self.accounting.refund(key.key_id, batch.n, served.name, mode, ids.request_id)
            self.stats.record(served.name, times, ok=False)
            logger.exception("inference on %s failed after the charge; refunded", served.name)
            raise ServiceUnavailableError(
                "inference failed; the request was not charged", code="inference_failed"
            ) from exc
        self.stats.record(served.name, times, ok=True)
        return values, headers

    async def _pipeline(self, served: ServedModel, key: KeyRecord) -> DefensePipeline:
        """The key's pipeline on this model, after the detector's verdict on the key."""
        pipeline = served.pipeline_for(key.tier, key.defense_profile)
        detector = served.detector
        if detector is not None and detector.params.action != "flag":
            flag = await detector.flag_of(self.defense_store, key.key_id, served.name)
            if flag is not None and detector.params.action == "refuse":
                # No statistics in the message: W and delta would tell an attacker how far to back off.
                raise PermissionDeniedError(
                    f"this key is suspected of model extraction on {served.name!r}; queries are refused",
                    code="extraction_suspected",
                )
            if flag is not None and detector.fallback is not None:
                pipeline = detector.fallback
        return pipeline

    @staticmethod
    def _refuse_unless_charged(result: ChargeResult, key: KeyRecord, n: int) -> dict[str, str]:
        """The rate-limit headers of a charged request, or the error of a refused one."""
        headers = rate_limit_headers(result, key.burst, key.rate)
        if result.status is ChargeStatus.CHARGED:
            return headers
        if result.status is ChargeStatus.RATE_LIMITED:
            retry = result.retry_after_s
            headers.update(
                {
                    "Retry-After": str(max(1, int(np.ceil(retry)))),
                    "retry-after-ms": str(int(np.ceil(retry * 1000))),
                    "x-should-retry": "true",
                }
            )
            raise RateLimitError(
                f"rate limit of {key.rate:g} images/s exceeded; retry in {retry:.3f} s", headers=headers
            )
        if result.status is ChargeStatus.BUDGET_EXHAUSTED:
            headers["x-should-retry"] = "false"
            raise BudgetExhaustedError(
                f"query budget exhausted: {result.used} of {result.budget} images used, "
                f"this request needs {n}",
                headers=headers,
            )
        if result.status is ChargeStatus.BATCH_OVER_BURST:
            raise PayloadTooLargeError(
                f"batch of {n} images is over this key's burst of {key.burst}",
                code="batch_over_burst",
                headers=headers,
            )
        raise AuthenticationError("invalid API key")  # unknown or revoked since it authenticated

    async def _run(
        self,
        served: ServedModel,
        key: KeyRecord,
        batch: Batch,
        pipeline: DefensePipeline,
        times: RequestTimes,
    ) -> dict[str, np.ndarray]:
        """The request's outputs: its images join its model's next forward (:mod:`server.batching`),
        and its own pipeline, keyed by its own key and digests, runs on its own rows only."""
        batcher = self.batchers[served.name]
        secret = self.secrets.server_secret
        detector = served.detector

        def context_of(x: torch.Tensor) -> DefenseContext | None:
            if not pipeline:
                return None
            return DefenseContext(
                key_id=key.key_id, model=served.name, digests=batch.digests, secret=secret, inputs=x
            )

        if detector is None and not pipeline.stateful:  # the common path: all of it on the worker

            def finish(x: torch.Tensor, raw: RawOutputs) -> dict[str, np.ndarray]:
                return served.finish(raw, batch.outputs, batch.top_k, pipeline, context_of(x))

            return await batcher.submit(batch.images, times, finish)

        # A detector or a stateful defense awaits Redis between the forward and the outputs.
        def rows(x: torch.Tensor, raw: RawOutputs) -> tuple[torch.Tensor, RawOutputs, list[int]]:
            n = int(x.shape[0])
            classes = raw[0].argmax(dim=1).tolist() if served.card.kind == "classifier" else [0] * n
            return x, raw, classes

        x, raw, classes = await batcher.submit(batch.images, times, rows)
        context = context_of(x)
        if detector is not None:
            await detector.observe(self.defense_store, key.key_id, served.name, x, classes)
        if pipeline.stateful:
            assert context is not None
            await pipeline.observe(raw[0], context, self.defense_store)

        def finish_rows() -> dict[str, np.ndarray]:
            started = time.perf_counter_ns()
            values = served.finish(raw, batch.outputs, batch.top_k, pipeline, context)
            times.compute_output_ns += time.perf_counter_ns() - started
            return values

        return await batcher.worker.call(finish_rows)


def check_images(served: ServedModel, images: np.ndarray) -> None:
    """A decoded batch against the model's card: ``[n, C, H, W]`` of its shape, uint8, or float32
    finite and within [0, 1]. Every wire format's batch passes here, once, before the charge."""
    expected = served.card.input.shape
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise InvalidInputError(
            f"input shape {list(images.shape)} does not match [n, {', '.join(map(str, expected))}] "
            f"(model {served.name} takes {'x'.join(map(str, expected))} images)",
            code="invalid_shape",
        )
    if images.dtype == np.float32:
        if not np.isfinite(images).all() or images.min(initial=0.0) < 0.0 or images.max(initial=0.0) > 1.0:
            raise InvalidInputError("FP32 inputs must be finite and within [0, 1]", code="invalid_range")
    elif images.dtype != np.uint8:
        raise InvalidInputError(
            f"datatype {images.dtype} not accepted; send UINT8 or FP32", code="invalid_dtype"
        )


def _parse_infer_body(body: bytes, header_length: str | None) -> tuple[InferRequest, memoryview]:
    """A KServe v2 body -> the validated request and the bytes after its JSON header."""
    try:
        if header_length is not None:
            if not (header_length.isascii() and header_length.isdigit()):
                raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer", code="invalid_header")
            header, blob = split_binary(body, int(header_length))
        else:
            header, blob = json.loads(body), memoryview(b"")
        return InferRequest.model_validate(header), blob
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InvalidRequestError("the body is not valid JSON", code="invalid_json") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidInputError(f"{where}: {err['msg']}", code="invalid_request_body", param=where) from None
    except (WireError, ValueError, OverflowError) as exc:  # numpy's own errors on absurd shapes too
        raise InvalidInputError(f"invalid tensor: {exc}", code="invalid_tensor") from None


def encode_infer_response(
    served: ServedModel, request: InferRequest, values: dict[str, np.ndarray], request_id: str
) -> tuple[bytes, str, int | None]:
    """KServe v2 response body: outputs asked with ``binary_data`` (or all, with the request's
    ``binary_data_output``) as raw bytes after the JSON header. Returns (body, media type, header length).
    """
    all_binary = bool(request.parameters.get("binary_data_output", False))
    wants_binary = {o.name: bool(o.parameters.get("binary_data", all_binary)) for o in request.outputs or []}
    entries: list[dict[str, Any]] = []
    blobs: list[np.ndarray] = []
    for name, array in values.items():
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array)}
        if wants_binary.get(name, all_binary):
            entry["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(array)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    header = {
        "model_name": served.name,
        "model_version": served.card.sha256[:12],
        "id": request.id or request_id,
        "outputs": entries,
    }
    if blobs:
        body, length = pack_binary(header, blobs)
        return body, BINARY_CONTENT_TYPE, length
    return json.dumps(header, separators=(",", ":")).encode(), "application/json", None

"""The charged inference path shared by every endpoint: validate, charge, run, refund on failure.

Everything that can reject a request (auth, permissions, shapes, sizes) happens before the charge,
so a rejected request charges nothing; a failure after the charge is refunded.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import numpy as np
import torch

from common.wire import BINARY_CONTENT_TYPE, WireError, datatype_of, pack_binary, tensor_from_json
from defenses.base import DefenseContext, image_digests
from defenses.state import DefenseStore
from server.accounting import Accounting, ChargeStatus, rate_limit_headers
from server.errors import (
    AuthenticationError,
    BudgetExhaustedError,
    InvalidInputError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from server.keys import KeyRecord
from server.registry import OUTPUT_MODES, ServedModel
from server.schemas import InferRequest

ACCEPTED_DATATYPES = ("UINT8", "FP32")


def check_model_access(served: ServedModel, key: KeyRecord) -> None:
    """403 unless the key may query this model at all."""
    if not key.allows_model(served.name):
        raise PermissionDeniedError(f"this key may not query model {served.name!r}", code="model_not_allowed")


def check_outputs(served: ServedModel, key: KeyRecord, requested: list[str] | None) -> list[str]:
    """The outputs to compute: the requested ones if the key's tier allows them all, else a 403."""
    check_model_access(served, key)
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


def check_batch(n: int, max_batch: int) -> None:
    """At least one image, at most ``max_batch``."""
    if n < 1:
        raise InvalidInputError("a request needs at least one image", code="empty_batch")
    if n > max_batch:
        raise PayloadTooLargeError(
            f"batch of {n} images is over the limit of {max_batch}", code="batch_too_large"
        )


async def charged_inference(
    *,
    served: ServedModel,
    key: KeyRecord,
    images: np.ndarray,
    outputs: list[str],
    top_k: int,
    accounting: Accounting,
    limiter: anyio.CapacityLimiter,
    request_id: str,
    secret: bytes = b"",
    expose_defense: bool = False,
    charge: bool = True,
    store: DefenseStore | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Charge ``len(images)`` queries, run the model behind the key's tier's defense pipeline, refund
    if it fails; returns outputs + headers.

    The defenses' noise is keyed by (``secret``, key, model, image digest). ``expose_defense`` names
    the pipeline in an ``x-stealrange-defense`` header. ``charge=False`` (the ``accounting_enabled``
    setting, for benchmarks) skips the accounting. Stateful defenses and the model's detector keep
    their state in ``store`` (Redis): a key the detector flagged is refused (403
    ``extraction_suspected``, before any charge) or served through the detector's stronger pipeline.
    """
    x: torch.Tensor = served.to_model_input(images)
    n = int(x.shape[0])
    mode = ",".join(sorted({OUTPUT_MODES[o] for o in outputs}))
    pipeline = served.pipeline_for(key.tier)
    detector = served.detector if store is not None else None
    if detector is not None and detector.params.action != "flag":
        assert store is not None
        flag = await detector.flag_of(store, key.key_id, served.name)
        if flag is not None and detector.params.action == "refuse":
            raise PermissionDeniedError(
                f"this key is suspected of model extraction on {served.name!r} (PRADA, W={flag['w']:.3f} "
                f"< {flag['delta']}); queries are refused",
                code="extraction_suspected",
            )
        if flag is not None and detector.fallback is not None:
            pipeline = detector.fallback
    if pipeline.stateful and store is None:
        raise ServiceUnavailableError(
            "a stateful defense needs the defense store", code="defense_unavailable"
        )
    context = (
        DefenseContext(
            key_id=key.key_id, model=served.name, digests=image_digests(images), secret=secret, inputs=x
        )
        if pipeline
        else None
    )
    defense_headers = {"x-stealrange-defense": repr(pipeline)} if expose_defense else {}

    async def run() -> dict[str, np.ndarray]:
        if detector is None and not pipeline.stateful:  # one thread hop: the common, stateless path
            return await anyio.to_thread.run_sync(
                lambda: served.compute(x, outputs, top_k, pipeline, context), limiter=limiter
            )
        raw = await anyio.to_thread.run_sync(served.forward, x, limiter=limiter)
        if detector is not None:
            assert store is not None
            classes = raw[0].argmax(dim=1).tolist() if served.card.kind == "classifier" else [0] * n
            await detector.observe(store, key.key_id, served.name, x, classes)
        if pipeline.stateful:
            assert store is not None and context is not None
            await pipeline.observe(raw[0], context, store)
        return await anyio.to_thread.run_sync(
            lambda: served.finish(raw, outputs, top_k, pipeline, context), limiter=limiter
        )

    if not charge:
        return await run(), defense_headers
    result = await accounting.charge(key.key_id, n, served.name, mode, request_id)
    headers = rate_limit_headers(result, key.burst, key.rate)
    if result.status is ChargeStatus.RATE_LIMITED:
        retry = result.retry_after_s
        headers.update(
            {
                "Retry-After": str(max(1, int(np.ceil(retry)))),
                "retry-after-ms": str(int(np.ceil(retry * 1000))),
            }
        )
        headers["x-should-retry"] = "true"
        raise RateLimitError(
            f"rate limit of {key.rate:g} images/s exceeded; retry in {retry:.3f} s", headers=headers
        )
    if result.status is ChargeStatus.BUDGET_EXHAUSTED:
        headers["x-should-retry"] = "false"
        raise BudgetExhaustedError(
            f"query budget exhausted: {result.used} of {result.budget} images used, this request needs {n}",
            headers=headers,
        )
    if result.status is ChargeStatus.BATCH_OVER_BURST:
        raise PayloadTooLargeError(
            f"batch of {n} images is over this key's burst of {key.burst}",
            code="batch_over_burst",
            headers=headers,
        )
    if result.status in (ChargeStatus.UNKNOWN_KEY, ChargeStatus.REVOKED):
        raise AuthenticationError("invalid API key")
    try:
        values = await run()
    except Exception as exc:
        await accounting.refund(key.key_id, n, served.name, mode, request_id)
        raise ServiceUnavailableError(
            "inference failed; the request was not charged", code="inference_failed"
        ) from exc
    return values, {**headers, **defense_headers}


def validate_infer_request(
    served: ServedModel,
    key: KeyRecord,
    request: InferRequest,
    binary_input: np.ndarray | None,
    max_batch: int,
) -> tuple[np.ndarray, list[str], int]:
    """Everything that can reject a KServe infer request, before any charge: (images, outputs, k)."""
    tensor = request.inputs[0]
    expected = ", ".join(map(str, served.card.input.shape))
    if len(tensor.shape) != 4:
        raise InvalidInputError(f"input shape {tensor.shape} must be [n, {expected}]", code="invalid_shape")
    check_batch(tensor.shape[0], max_batch)
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
    outputs = check_outputs(served, key, requested)
    top_k = request.parameters.get("top_k", 5) if served.card.kind == "classifier" else 1
    if (
        not isinstance(top_k, int)
        or isinstance(top_k, bool)
        or not 1 <= top_k <= max(1, served.card.num_classes)
    ):
        raise InvalidInputError(
            f"parameters.top_k must be an integer in [1, {served.card.num_classes}]", code="invalid_top_k"
        )
    if binary_input is not None:
        return binary_input, outputs, top_k
    try:
        return tensor_from_json(tensor.data, tensor.datatype, tensor.shape), outputs, top_k
    except (WireError, ValueError, OverflowError) as exc:  # e.g. a JSON number too big for the dtype
        raise InvalidInputError(f"invalid tensor data: {exc}", code="invalid_tensor") from None


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

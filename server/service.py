"""The charged inference path shared by every endpoint: validate, charge, run, refund on failure.

Everything that can reject a request (auth, permissions, shapes, sizes) happens before the charge,
so a rejected request charges nothing; a failure after the charge is refunded.
"""

from __future__ import annotations

import anyio
import numpy as np
import torch

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


def check_outputs(served: ServedModel, key: KeyRecord, requested: list[str] | None) -> list[str]:
    """The outputs to compute: the requested ones if the key's tier allows them all, else a 403."""
    if not key.allows_model(served.name):
        raise PermissionDeniedError(f"this key may not query model {served.name!r}", code="model_not_allowed")
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
    charge: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Charge ``len(images)`` queries, run the model, refund if it fails; returns outputs + headers.

    ``charge=False`` (the ``accounting_enabled`` setting, for benchmarks) skips the accounting.
    """
    x: torch.Tensor = served.to_model_input(images)
    n = int(x.shape[0])
    mode = ",".join(sorted({OUTPUT_MODES[o] for o in outputs}))
    if not charge:
        values = await anyio.to_thread.run_sync(served.compute, x, outputs, top_k, limiter=limiter)
        return values, {}
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
        values = await anyio.to_thread.run_sync(served.compute, x, outputs, top_k, limiter=limiter)
    except Exception as exc:
        await accounting.refund(key.key_id, n, served.name, mode, request_id)
        raise ServiceUnavailableError(
            "inference failed; the request was not charged", code="inference_failed"
        ) from exc
    return values, headers

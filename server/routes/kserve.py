"""KServe v2 / Open Inference Protocol endpoints, with Triton's binary tensor extension."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from common.wire import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    WireError,
    split_binary,
    take_binary,
)
from server import __version__
from server.deps import AccountingDep, ApiKeyDep, RegistryDep, RequestIdDep, SettingsDep
from server.errors import ERROR_RESPONSES, InvalidInputError, InvalidRequestError, ServiceUnavailableError
from server.schemas import Health, InferRequest, InferResponse, ModelMetadata, ServerMetadata, TensorMetadata
from server.service import (
    charged_inference,
    check_model_access,
    encode_infer_response,
    validate_infer_request,
)

router = APIRouter(tags=["KServe v2"])


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``#/$defs/...`` refs inlined: those refs cannot resolve once the
    schema is embedded in the OpenAPI document (whose root has no ``$defs``)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_INFER_BODY = _inline_defs(InferRequest.model_json_schema())
_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "A KServe v2 inference request as JSON, or Triton's binary tensor extension: the JSON header "
            f"followed by raw little-endian tensor bytes, with its length in the `{HEADER_LENGTH}` header. "
            "Inputs: one tensor [n, C, H, W] of UINT8 (0..255) or FP32 (within [0, 1]). Outputs: logits, "
            "probabilities, label, top_k_indices + top_k_probabilities (k from parameters.top_k, default 5) "
            "for classifiers; embedding for encoders; request `parameters.binary_data: true` on an output "
            "(or `binary_data_output: true` on the request) for raw bytes back. Each image is one query."
        ),
        "content": {
            "application/json": {"schema": _INFER_BODY},
            BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="stealrange", version=__version__, extensions=["binary_tensor_data", "usage"])


@router.get("/v2/health/live", response_model=Health, summary="Liveness")
async def live() -> Health:
    return Health(live=True)


@router.get(
    "/v2/health/ready",
    response_model=Health,
    summary="Readiness: models loaded and Redis answers",
    responses={503: {"description": "not ready"}},
)
async def ready(request: Request, registry: RegistryDep) -> Health:
    try:
        redis_ok = bool(await request.app.state.redis.ping())
    except Exception:
        redis_ok = False
    detail = {"models": registry.names(), "redis": redis_ok}
    if not (redis_ok and registry.models):
        raise ServiceUnavailableError(f"not ready: {json.dumps(detail)}", code="not_ready")
    return Health(live=True, ready=True, detail=detail)


@router.get(
    "/v2/models/{name}",
    response_model=ModelMetadata,
    summary="Model metadata (input shape, dtype, normalisation, classes, output modes)",
    responses={k: ERROR_RESPONSES[k] for k in (401, 404)},
)
async def model_metadata(
    name: str, key: ApiKeyDep, registry: RegistryDep, settings: SettingsDep
) -> ModelMetadata:
    served = registry.get(name)
    check_model_access(served, key)  # 403 for a model this key may not query
    card = served.card
    c, h, w = card.input.shape
    outputs = []
    for out in served.output_names:
        if out == "label":
            outputs.append(TensorMetadata(name=out, datatype="INT64", shape=[-1]))
        elif out == "top_k_indices":
            outputs.append(TensorMetadata(name=out, datatype="INT64", shape=[-1, -1]))
        else:
            width = (
                card.feature_dim
                if out == "embedding"
                else (-1 if out == "top_k_probabilities" else card.num_classes)
            )
            outputs.append(TensorMetadata(name=out, datatype="FP32", shape=[-1, width]))
    return ModelMetadata(
        name=card.name,
        versions=[card.sha256[:12]],
        kind=card.kind,
        inputs=[TensorMetadata(name="images", datatype="UINT8", shape=[-1, c, h, w])],
        outputs=outputs,
        normalisation={"mean": card.mean, "std": card.std},
        classes=card.classes,
        embedding_dim=card.feature_dim if card.kind == "encoder" else None,
        output_modes={tier: list(card.modes_for_tier(tier)) for tier in card.tiers},
        allowed_outputs=served.outputs_for_tier(key.tier),
        default_outputs=served.default_outputs(key.tier),
        max_batch=settings.max_batch,
        dataset=card.dataset,
        metrics=card.metrics,
    )


@router.get(
    "/v2/models/{name}/ready",
    response_model=Health,
    summary="Model readiness",
    responses={404: ERROR_RESPONSES[404]},
)
async def model_ready(name: str, registry: RegistryDep) -> Health:
    registry.get(name)
    return Health(live=True, ready=True)


def _parse_body(body: bytes, header_length: str | None) -> tuple[InferRequest, list[np.ndarray | None]]:
    try:
        if header_length is not None:
            if not (header_length.isascii() and header_length.isdigit()):
                raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer", code="invalid_header")
            header, blob = split_binary(body, int(header_length))
        else:
            header, blob = json.loads(body), memoryview(b"")
        request = InferRequest.model_validate(header)
        request_inputs = [i.model_dump() for i in request.inputs]
        binary = take_binary(request_inputs, blob)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InvalidRequestError("the body is not valid JSON", code="invalid_json") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidInputError(f"{where}: {err['msg']}", code="invalid_request_body") from None
    except (WireError, ValueError, OverflowError) as exc:  # numpy's own errors on absurd shapes too
        raise InvalidInputError(f"invalid tensor: {exc}", code="invalid_tensor") from None
    return request, binary


@router.post(
    "/v2/models/{name}/infer",
    response_model=InferResponse,
    summary="Inference: classifier outputs or encoder embeddings; 1 image = 1 query",
    openapi_extra=_INFER_OPENAPI,
    responses={**ERROR_RESPONSES, 200: {"content": {BINARY_CONTENT_TYPE: {}}}},
)
async def infer(
    name: str,
    request: Request,
    key: ApiKeyDep,
    registry: RegistryDep,
    settings: SettingsDep,
    accounting: AccountingDep,
    request_id: RequestIdDep,
) -> Response:
    served = registry.get(name)
    check_model_access(served, key)  # before reading the body
    infer_request, binary = _parse_body(await request.body(), request.headers.get(HEADER_LENGTH.lower()))
    images, outputs, top_k = validate_infer_request(served, key, infer_request, binary[0], settings.max_batch)
    values, headers = await charged_inference(
        served=served,
        key=key,
        images=images,
        outputs=outputs,
        top_k=top_k,
        accounting=accounting,
        limiter=request.app.state.inference_limiter,
        request_id=request_id,
        secret=settings.server_secret.get_secret_value().encode(),
        expose_defense=settings.expose_defense,
        charge=settings.accounting_enabled,
        store=request.app.state.defense_store,
    )
    body, media_type, length = encode_infer_response(served, infer_request, values, request_id)
    if length is not None:
        headers[HEADER_LENGTH] = str(length)
    return Response(body, media_type=media_type, headers=headers)

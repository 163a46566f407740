"""KServe v2 / Open Inference Protocol endpoints, with Triton's binary tensor, model-configuration
and statistics extensions. Every route that names a model needs a key that may query it; any other
model, existing or not, is the same 404."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from common.wire import BINARY_CONTENT_TYPE, HEADER_LENGTH
from server import __version__
from server.deps import (
    API_KEY_SECURITY,
    ApiKeyDep,
    InferenceCallDep,
    InferenceRoute,
    RedisDep,
    RegistryDep,
    ServiceDep,
    SettingsDep,
    StatsDep,
)
from server.errors import KSERVE_ERROR_RESPONSES, ServiceUnavailableError
from server.registry import ServedModel
from server.schemas import (
    Health,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
    TritonModelConfig,
    TritonStatistics,
    TritonTensorConfig,
)
from server.service import encode_infer_response

router = APIRouter(tags=["KServe v2"])
# The data plane (inference), included before every other route: FastAPI tries routes in order.
inference_router = APIRouter(tags=["KServe v2"], route_class=InferenceRoute)


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
    },
    "security": API_KEY_SECURITY,
}


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(
        name="stealrange",
        version=__version__,
        extensions=["binary_tensor_data", "model_configuration", "statistics", "usage"],
    )


@router.get("/v2/health/live", response_model=Health, summary="Liveness")
async def live() -> Health:
    return Health(live=True)


@router.get(
    "/v2/health/ready",
    response_model=Health,
    summary="Readiness: models loaded and Redis answers",
    responses={503: {"description": "not ready"}},
)
async def ready(redis: RedisDep, registry: RegistryDep) -> Health:
    try:
        redis_ok = bool(await redis.ping())
    except Exception:
        redis_ok = False
    # No model names here: this route needs no key, and names are for keys that may query them.
    detail = {"models": len(registry.models), "redis": redis_ok}
    if not (redis_ok and registry.models):
        raise ServiceUnavailableError(
            f"not ready: {len(registry.models)} models, redis {'up' if redis_ok else 'down'}",
            code="not_ready",
        )
    return Health(live=True, ready=True, detail=detail)


# Registered before /v2/models/{name}, which would otherwise take "stats" for a model name.
@router.get(
    "/v2/models/stats",
    response_model=TritonStatistics,
    summary="Inference statistics of every model this key may query (Triton's statistics extension)",
    responses={401: KSERVE_ERROR_RESPONSES[401]},
)
async def all_model_stats(key: ApiKeyDep, service: ServiceDep, stats: StatsDep) -> TritonStatistics:
    entries = [await stats.read(s.name, s.card.sha256[:12]) for s in service.visible_models(key)]
    return TritonStatistics.model_validate({"model_stats": entries})


def _output_metadata(served: ServedModel) -> list[TensorMetadata]:
    card = served.card
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
    return outputs


@router.get(
    "/v2/models/{name}",
    response_model=ModelMetadata,
    summary="Model metadata (input shape, dtype, normalisation, classes, output modes)",
    responses={k: KSERVE_ERROR_RESPONSES[k] for k in (401, 404)},
)
async def model_metadata(
    name: str, key: ApiKeyDep, service: ServiceDep, settings: SettingsDep
) -> ModelMetadata:
    served = service.model_for(name, key)
    card = served.card
    c, h, w = card.input.shape
    return ModelMetadata(
        name=card.name,
        versions=[card.sha256[:12]],
        kind=card.kind,
        inputs=[TensorMetadata(name="images", datatype="UINT8", shape=[-1, c, h, w])],
        outputs=_output_metadata(served),
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
    responses={k: KSERVE_ERROR_RESPONSES[k] for k in (401, 404)},
)
async def model_ready(name: str, key: ApiKeyDep, service: ServiceDep) -> Health:
    service.model_for(name, key)
    return Health(live=True, ready=True)


@router.get(
    "/v2/models/{name}/config",
    response_model=TritonModelConfig,
    summary="Model configuration (Triton's model-configuration extension)",
    responses={k: KSERVE_ERROR_RESPONSES[k] for k in (401, 404)},
)
async def model_config(
    name: str, key: ApiKeyDep, service: ServiceDep, settings: SettingsDep
) -> TritonModelConfig:
    """The model as Triton describes it: with ``max_batch_size`` > 0 the batch dimension is implicit,
    so ``dims`` leave it out. The input also accepts FP32 in [0, 1] (see the model metadata)."""
    served = service.model_for(name, key)
    card = served.card
    allowed = set(served.outputs_for_tier(key.tier))
    outputs = [
        TritonTensorConfig(
            name=meta.name,
            data_type="TYPE_" + meta.datatype,
            dims=meta.shape[1:] or [1],
        )
        for meta in _output_metadata(served)
        if meta.name in allowed
    ]
    return TritonModelConfig(
        name=card.name,
        max_batch_size=settings.max_batch,
        input=[
            TritonTensorConfig(
                name="images", data_type="TYPE_UINT8", format="FORMAT_NCHW", dims=list(card.input.shape)
            )
        ],
        output=outputs,
        parameters={"kind": {"string_value": card.kind}, "version": {"string_value": card.sha256[:12]}},
    )


@router.get(
    "/v2/models/{name}/stats",
    response_model=TritonStatistics,
    summary="Inference statistics of one model (Triton's statistics extension)",
    responses={k: KSERVE_ERROR_RESPONSES[k] for k in (401, 404)},
)
async def model_stats(name: str, key: ApiKeyDep, service: ServiceDep, stats: StatsDep) -> TritonStatistics:
    served = service.model_for(name, key)
    entry = await stats.read(served.name, served.card.sha256[:12])
    return TritonStatistics.model_validate({"model_stats": [entry]})


@inference_router.post(
    "/v2/models/{name}/infer",
    response_model=InferResponse,
    summary="Inference: classifier outputs or encoder embeddings; 1 image = 1 query",
    openapi_extra=_INFER_OPENAPI,
    responses={**KSERVE_ERROR_RESPONSES, 200: {"content": {BINARY_CONTENT_TYPE: {}}}},
)
async def infer(name: str, request: Request, call: InferenceCallDep) -> Response:
    service, key, ids = call.service, call.key, call.ids
    served = service.model_for(name, key)  # the key is checked before the body is read
    body = await request.body()
    infer_request, batch = await service.kserve_batch(
        served, key, body, request.headers.get(HEADER_LENGTH.lower())
    )
    values, headers = await service.infer(served, key, batch, ids)
    content, media_type, length = await service.cpu(
        encode_infer_response,
        served,
        infer_request,
        values,
        ids.request_id,
        work_bytes=sum(v.nbytes for v in values.values()),
    )
    if length is not None:
        headers[HEADER_LENGTH] = str(length)
    return Response(content, media_type=media_type, headers=headers)

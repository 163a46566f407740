"""OpenAI-style endpoints: ``POST /v1/embeddings`` for encoders and ``GET /v1/models``."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request, Response

from server.deps import AccountingDep, ApiKeyDep, RegistryDep, RequestIdDep, SettingsDep
from server.errors import ERROR_RESPONSES, InvalidInputError
from server.images import b64decode_limited, decode_image
from server.schemas import (
    EmbeddingItem,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    OpenAIModel,
    OpenAIModelList,
)
from server.service import charged_inference, check_batch, check_outputs

router = APIRouter(tags=["OpenAI-style"])


@router.get(
    "/v1/models",
    response_model=OpenAIModelList,
    summary="Models this key may query",
    responses={401: ERROR_RESPONSES[401]},
)
async def list_models(key: ApiKeyDep, registry: RegistryDep) -> OpenAIModelList:
    data = [
        OpenAIModel(id=name, kind=registry.models[name].card.kind)
        for name in registry.names()
        if key.allows_model(name)
    ]
    return OpenAIModelList(data=data)


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    summary="Embed images with an encoder; usage.images counts the queries charged",
    responses=ERROR_RESPONSES,
)
async def embeddings(
    body: EmbeddingsRequest,
    request: Request,
    response: Response,
    key: ApiKeyDep,
    registry: RegistryDep,
    settings: SettingsDep,
    accounting: AccountingDep,
    request_id: RequestIdDep,
) -> EmbeddingsResponse:
    served = registry.get(body.model)
    if served.card.kind != "encoder":
        raise InvalidInputError(
            f"model {served.name!r} is a {served.card.kind}, not an encoder", code="not_an_encoder"
        )
    outputs = check_outputs(served, key, ["embedding"])
    items = [body.input] if isinstance(body.input, str) else body.input
    check_batch(len(items), settings.max_batch)
    spec = served.card.input
    images = []
    for i, item in enumerate(items):
        raw = b64decode_limited(item, settings.max_image_bytes, what=f"input[{i}]")
        if body.input_type == "tensor":
            if len(raw) != spec.channels * spec.height * spec.width:
                raise InvalidInputError(
                    f"input[{i}] has {len(raw)} bytes; a raw uint8 "
                    f"{spec.channels}x{spec.height}x{spec.width} "
                    f"tensor has {spec.channels * spec.height * spec.width}",
                    code="invalid_shape",
                )
            images.append(np.frombuffer(raw, dtype=np.uint8).reshape(spec.shape))
        else:
            try:
                images.append(decode_image(raw, spec, settings.image_formats, settings.max_image_pixels))
            except InvalidInputError as exc:
                exc.message = f"input[{i}]: {exc.message}"
                exc.detail = exc.message
                raise
    values, headers = await charged_inference(
        served=served,
        key=key,
        images=np.stack(images),
        outputs=outputs,
        top_k=1,
        accounting=accounting,
        limiter=request.app.state.inference_limiter,
        request_id=request_id,
        secret=settings.server_secret.get_secret_value().encode(),
        expose_defense=settings.expose_defense,
        charge=settings.accounting_enabled,
        store=request.app.state.defense_store,
    )
    response.headers.update(headers)
    vectors = values["embedding"].astype("<f4")
    data = [
        EmbeddingItem(
            index=i,
            embedding=base64.b64encode(v.tobytes()).decode()
            if body.encoding_format == "base64"
            else v.tolist(),
        )
        for i, v in enumerate(vectors)
    ]
    return EmbeddingsResponse(data=data, model=served.name, usage=EmbeddingsUsage(images=len(items)))

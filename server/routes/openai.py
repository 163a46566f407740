"""OpenAI-style endpoints: ``POST /v1/embeddings`` for encoders and ``GET /v1/models``.

The embeddings body is read only after the key is checked (FastAPI would parse a declared body
parameter before any dependency), and parsed and decoded in a worker thread.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from server.deps import API_KEY_SECURITY, ApiKeyDep, InferenceCallDep, ServiceDep
from server.errors import ERROR_RESPONSES
from server.schemas import (
    EmbeddingItem,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    OpenAIModel,
    OpenAIModelList,
)

router = APIRouter(tags=["OpenAI-style"])
inference_router = APIRouter(tags=["OpenAI-style"])  # the data plane, included first

_EMBEDDINGS_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": EmbeddingsRequest.model_json_schema()}},
    },
    "security": API_KEY_SECURITY,
}


@router.get(
    "/v1/models",
    response_model=OpenAIModelList,
    summary="Models this key may query",
    responses={401: ERROR_RESPONSES[401]},
)
async def list_models(key: ApiKeyDep, service: ServiceDep) -> OpenAIModelList:
    return OpenAIModelList(
        data=[OpenAIModel(id=s.name, kind=s.card.kind) for s in service.visible_models(key)]
    )


def _embedding_items(vectors: np.ndarray, encoding_format: str) -> list[EmbeddingItem]:
    vectors = vectors.astype("<f4")
    return [
        EmbeddingItem(
            index=i,
            embedding=base64.b64encode(v.tobytes()).decode() if encoding_format == "base64" else v.tolist(),
        )
        for i, v in enumerate(vectors)
    ]


@inference_router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    summary="Embed images with an encoder; usage.images (and the token counts) count the queries charged",
    responses=ERROR_RESPONSES,
    openapi_extra=_EMBEDDINGS_OPENAPI,
)
async def embeddings(request: Request, response: Response, call: InferenceCallDep) -> EmbeddingsResponse:
    service, key, ids = call.service, call.key, call.ids
    body = await request.body()  # only now: the key is valid
    parsed, served, batch = await service.embeddings_batch(key, body)
    values, headers = await service.infer(served, key, batch, ids)
    response.headers.update(headers)
    data = await service.cpu(_embedding_items, values["embedding"], parsed.encoding_format)
    return EmbeddingsResponse(data=data, model=served.name, usage=EmbeddingsUsage.of_images(batch.n))

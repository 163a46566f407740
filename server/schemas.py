"""Request and response bodies of the API (KServe v2, OpenAI-style embeddings, usage, admin)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.models import ModelKind
from server.keys import KeyRecord

Number = int | float


class TensorInput(BaseModel):
    """One KServe v2 input tensor: inline ``data`` (JSON) or ``parameters.binary_data_size`` (binary)."""

    name: str = Field(max_length=64)
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16, description="UINT8 (0..255) or FP32 (within [0, 1])")
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class TensorOutputRequest(BaseModel):
    name: str = Field(max_length=64)
    parameters: dict[str, Any] = Field(
        default_factory=dict, description='{"binary_data": true} for raw bytes'
    )


class InferRequest(BaseModel):
    """KServe v2 inference request. ``parameters.top_k`` (default 5) sets k of the top-k outputs."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(None, max_length=128)
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorInput] = Field(min_length=1, max_length=1)
    outputs: list[TensorOutputRequest] | None = Field(None, max_length=8)


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Number] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: list[TensorOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """KServe v2 model metadata plus what an API user needs to query the model correctly."""

    name: str
    versions: list[str]
    platform: str = "pytorch"
    kind: ModelKind
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    input_datatypes: list[str] = ["UINT8", "FP32"]
    normalisation: dict[str, list[float]]
    classes: list[str]
    embedding_dim: int | None
    output_modes: dict[str, list[str]] = Field(description="tier -> output modes it may request")
    allowed_outputs: list[str] = Field(description="output tensors the calling key may request")
    default_outputs: list[str]
    max_batch: int
    dataset: str
    metrics: dict[str, float]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class EmbeddingsRequest(BaseModel):
    """OpenAI-style embeddings request; each input is one image (1 query = 1 image)."""

    model: str = Field(max_length=64)
    input: str | list[str] = Field(
        description="base64 images (PNG/JPEG, data URLs accepted) or, with input_type=tensor, base64 raw "
        "uint8 CHW bytes of the model's input shape"
    )
    input_type: Literal["image", "tensor"] = "image"
    encoding_format: Literal["float", "base64"] = Field("float", description="base64 = little-endian float32")
    user: str | None = Field(None, max_length=128)


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    """OpenAI's usage block; one image is one query and counts as one token, so token-based
    dashboards show the queries charged."""

    images: int
    prompt_tokens: int
    total_tokens: int

    @classmethod
    def of_images(cls, n: int) -> EmbeddingsUsage:
        return cls(images=n, prompt_tokens=n, total_tokens=n)


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingsUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "stealrange"
    kind: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class RatePolicy(BaseModel):
    images_per_second: float = Field(description="0 = no rate limit")
    burst: int


class KeyFlag(BaseModel):
    """What a key is told of a detection: which one, and since when; not the detector's statistics."""

    flag: str
    detector: str | None = None
    since: float | None = Field(None, description="Unix time of the detection")


class Usage(BaseModel):
    """A key's lifetime budget and rate policy, read live from Redis."""

    key_id: str
    name: str
    tier: str
    models: list[str]
    budget: int = Field(description="-1 = unlimited")
    used: int
    remaining: int = Field(description="-1 = unlimited")
    rate: RatePolicy
    revoked: bool
    flags: dict[str, KeyFlag] = Field(
        default_factory=dict,
        description="detections by model, e.g. a detector's extraction_suspected (the statistics behind a "
        "flag are for the admin API only)",
    )


class KeyList(BaseModel):
    keys: list[KeyRecord]


class Health(BaseModel):
    live: bool = True
    ready: bool | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class TritonTensorConfig(BaseModel):
    """One input or output of Triton's model configuration."""

    name: str
    data_type: str
    format: str | None = None
    dims: list[int]


class TritonModelConfig(BaseModel):
    """Triton's model-configuration extension (``GET /v2/models/{name}/config``)."""

    name: str
    platform: str = "pytorch_libtorch"
    backend: str = "pytorch"
    max_batch_size: int
    input: list[TritonTensorConfig]
    output: list[TritonTensorConfig]
    parameters: dict[str, dict[str, str]] = Field(default_factory=dict)


class TritonInferStat(BaseModel):
    count: int
    ns: int


class TritonModelStats(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="milliseconds since the epoch; 0 = never")
    inference_count: int = Field(description="images inferred (1 query = 1 image)")
    execution_count: int = Field(description="forward passes")
    inference_stats: dict[str, TritonInferStat]
    batch_stats: list[dict[str, Any]] = Field(default_factory=list)


class TritonStatistics(BaseModel):
    """Triton's statistics extension (``GET /v2/models/stats``, ``/v2/models/{name}/stats``)."""

    model_stats: list[TritonModelStats]

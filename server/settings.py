"""Server settings: one pydantic-settings class, every field overridable by a ``STEALRANGE_`` env var.

Secrets (``admin_token``, ``key_pepper``, ``server_secret``) have no usable default: unset or empty
is no value. An unset admin token disables the admin API; an unset pepper or server secret is
generated at random on first start and shared through Redis (:mod:`server.secrets`). A secret that
is set must be at least :data:`MIN_SECRET_LENGTH` characters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_SECRET_LENGTH = 16
BatchSize = Annotated[int, Field(ge=1, le=65536)]
GraphMode = Literal["torchscript", "eager"]  # how forwards run (server.graphs)
# uvicorn's keep-alive timeout for the API (every way this project starts it: `stealrange serve`,
# the range's victim process, the Docker image). Longer than any common client's idle expiry
# (httpx: 5 s, uvicorn's own default too): when both sides give up on an idle connection at the same
# moment, a request sent on it as the server closes it is lost (httpx.ReadError; 1 run in 4 of the
# two-worker test under 200 concurrent requests, 0 in 8 with this). The client should close first.
KEEP_ALIVE_S = 75


class BatchingOverride(BaseModel):
    """One model's dynamic batching (an entry of ``model_batching``); an unset field keeps the
    server's own setting (``batching``, ``batch_max_images``, ``batch_queue_delay_us``,
    ``batch_preferred_sizes``). See :mod:`server.batching`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool | None = None
    max_batch_images: BatchSize | None = None
    max_queue_delay_us: int | None = Field(None, ge=0, le=1_000_000)
    preferred_batch_sizes: list[BatchSize] | None = None


class ServerSettings(BaseSettings):
    """Everything the victim API reads from its environment (prefix ``STEALRANGE_``)."""

    model_config = SettingsConfigDict(
        env_prefix="STEALRANGE_", env_file=None, extra="ignore", hide_input_in_errors=True
    )

    model_store: Path = Field(Path("model_store"), description="folder of checkpoint folders to serve")
    redis_url: str | None = Field(
        None, description="redis:// URL; unset = embedded in-process Redis (fakeredis, one worker only)"
    )
    redis_cluster: bool = Field(
        False,
        description="redis_url names one node of a Redis Cluster: use redis-py's cluster client (the "
        "other nodes are discovered from it; see server.redis_client)",
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin endpoints; unset or empty = admin API disabled"
    )
    key_pepper: SecretStr | None = Field(
        None,
        description="secret mixed into stored API-key hashes; unset = random, generated once, kept in Redis",
    )
    server_secret: SecretStr | None = Field(
        None,
        description="keys the per-(key, input) defense noise and B4B's transforms; unset = random, "
        "generated once, kept in Redis",
    )
    redis_max_connections: int = Field(
        64, ge=1, description="Redis connections per worker (on a cluster: per node, and commands in flight)"
    )
    redis_timeout: float = Field(
        10.0, gt=0, description="seconds a request waits for a free Redis connection"
    )
    redis_prefix: str = Field(
        "sr", pattern=r"^[a-zA-Z0-9_.-]{1,32}$", description="prefix of every Redis key"
    )

    max_batch: int = Field(256, ge=1, le=65536, description="most images in one request")
    max_body_bytes: int = Field(16 << 20, ge=1024, description="largest request body, counted on the stream")
    max_json_tensor_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="largest KServe JSON body (JSON numbers cost ~35 ns each to parse, holding the GIL; "
        "send larger batches with the binary extension)",
    )
    max_image_bytes: int = Field(1 << 20, ge=64, description="largest encoded image in /v1/embeddings")
    max_image_pixels: int = Field(1 << 22, ge=1, description="largest decoded image (width x height)")
    image_formats: list[str] = Field(["PNG", "JPEG"], description="encoded image formats accepted")
    audit_maxlen: int = Field(
        100_000, ge=100, description="approximate length bound of each key's audit stream"
    )

    default_budget: int = Field(10_000, ge=-1, description="lifetime images of a new key; -1 = unlimited")
    default_rate: float = Field(0.0, ge=0, description="images/s of a new key; 0 = no rate limit")
    default_burst: int = Field(1024, ge=1, description="images a new key may send at once")

    inference_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="long-lived inference threads per worker, models assigned round-robin by name (one "
        "per model at >= the number of models); every forward runs on them. 1 suits a CPU: each thread "
        "keeps its own OpenMP team, and teams beyond the cores make every forward slow",
    )
    key_cache_ttl_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="seconds a worker may reuse a key's record on charged requests (inference), "
        "saving a Redis round trip; revocation and budgets are still checked by the charge script "
        "on every request, so a revoked key is still refused at once (only its body may be read and "
        "parsed first, for up to this long); other routes always read Redis. 0 = off",
    )
    key_cache_size: int = Field(10_000, ge=1, description="most key records a worker caches")
    inline_cpu_bytes: int = Field(
        8192,
        ge=0,
        le=1 << 20,
        description="a KServe body (and an answer's outputs) of at most this many bytes is parsed "
        "(encoded) on the event loop: its work is bounded by its size and costs less than the thread "
        "hop it would take; larger ones, and every encoded image, go to a worker thread. 0 = always hop",
    )
    batching: bool = Field(
        True, description="dynamic batching: concurrent requests to a model share forwards"
    )
    batch_max_images: BatchSize | None = Field(
        None, description="most images in one batched forward; unset = max_batch (a request is never split)"
    )
    batch_queue_delay_us: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="microseconds the oldest waiting request may be held for company (Triton's "
        "max_queue_delay_microseconds); 0 = batch only what waits while the model is busy",
    )
    batch_preferred_sizes: list[BatchSize] = Field(
        [], description="batch sizes cut at once when the queue can fill one (Triton's preferred_batch_size)"
    )
    model_batching: dict[str, BatchingOverride] = Field(
        {},
        description='per-model batching over the server\'s, as JSON: {"clf": {"max_queue_delay_us": 500, '
        '"preferred_batch_sizes": [16, 64]}, "enc": {"enabled": false}}',
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; unset = torch's default"
    )
    gil_switch_interval_us: int | None = Field(
        200,
        ge=50,
        le=100_000,
        description="the worker's GIL switch interval (sys.setswitchinterval) in microseconds: how long "
        "the inference thread may wait for the GIL after each small torch op while the event loop runs "
        "Python (Python's 5000 made a busy server's per-request outputs ~7x slower); unset = Python's",
    )
    serving_graph: GraphMode = Field(
        "torchscript",
        description="how forwards run: a frozen TorchScript graph per model, which runs without the GIL "
        "so the event loop's work does not stall it (a model that cannot be traced is served eager), "
        "or the eager module (server.graphs)",
    )
    device: str = Field("cpu", description="device of the served models: cpu, cuda, cuda:i")
    accounting_enabled: bool = Field(
        True,
        description="benchmarking only: False serves authenticated requests without charging them "
        "(warned at start, and every answer carries x-stealrange-unmetered: true)",
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry spans, metrics and logs (with an OpenTelemetry SDK "
        "configured in the process); off, the per-request provider checks are skipped",
    )
    expose_defense: bool = Field(False, description="name the applied defenses in responses")

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> ServerSettings:
        """A cluster is reached through one of its nodes: ``redis_cluster`` alone names no Redis."""
        if self.redis_cluster and not self.redis_url:
            raise ValueError("redis_cluster needs redis_url: the redis:// URL of one node of the cluster")
        return self

    @field_validator("admin_token", "key_pepper", "server_secret", mode="before")
    @classmethod
    def _no_empty_secret(cls, value: object) -> object:
        """An empty or blank secret is no secret: it reads as unset, never as a value that matches."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if isinstance(raw, str) and len(raw) < MIN_SECRET_LENGTH:
            raise ValueError(f"a secret needs at least {MIN_SECRET_LENGTH} characters")
        return value

"""What every stealing run shares (``steal_encoder``, ``steal_classifier``): the run folder's file
names, the attacker's query pool, the victim's local white-box checkpoint, the versions recorded."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from attacker_client.client import VictimClient
from common.checkpoints import InputSpec, read_card
from common.datasets import ImageData, get_dataset, make_splits

RESULT_FILE = "result.json"
CACHE_FILE = "query_cache.sqlite"
SURROGATE_DIR = "surrogate"


class StealingRunConfig(BaseModel):
    """What every run's config holds: the victim, the key, the attack's parameters, the query pool,
    the budget, the run folder; each run's config adds its own (and its own defaults)."""

    model_config = ConfigDict(extra="forbid")

    url: str
    key: SecretStr
    model: str
    params: dict[str, Any] = Field(default_factory=dict, description="the attack's parameters")
    query_set: str = "fashion_mnist"
    query_split: str = "attacker"
    budget: int = Field(ge=1)
    out: Path
    device: str = "auto"
    data_root: Path | None = None
    progress: bool | None = None
    cache_namespace: str | None = Field(
        None, description="keys the query cache instead of the URL (the range: stable across ports)"
    )


def query_pool(name: str, split: str, spec: InputSpec, data_root: Path | None) -> ImageData:
    """The attacker's query images, adapted to the victim's input (channels, size).

    ``split`` is ``train`` or ``test`` of the dataset, or ``attacker``: the attacker's pool of
    :func:`common.datasets.make_splits` (seed 0), the half of the train split the victim's recipe
    did not train on (in-distribution data the victim never saw).
    """
    if split == "attacker":
        data = make_splits(name, root=data_root).attacker_pool
    else:
        data = get_dataset(name, split, root=data_root)
    return data.adapt(spec.channels, (spec.height, spec.width))


def find_victim_checkpoint(given: Path | None, model: str, version: str) -> Path | None:
    """The victim's local checkpoint: ``given``, else ``$STEALRANGE_MODEL_STORE/<model>`` (or
    ``./model_store/<model>``) when its weights' digest is the served version's."""
    if given is not None:
        return given
    store = Path(os.environ.get("STEALRANGE_MODEL_STORE") or "model_store")
    folder = store / model
    try:
        card = read_card(folder)
    except (FileNotFoundError, ValueError):
        return None
    return folder if version and card.sha256.startswith(version) else None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("stealrange")
    except PackageNotFoundError:
        own = "unknown"
    return {"stealrange": own, "torch": torch.__version__, "python": platform.python_version()}


class ClientSettings(Protocol):
    """What a run's config says about reaching the victim."""

    url: str
    key: SecretStr
    progress: bool | None
    cache_namespace: str | None


def open_victim_client(config: ClientSettings, out: Path) -> VictimClient:
    """The run's client: its query cache in ``out``, keyed by ``cache_namespace`` when given."""
    return VictimClient(
        config.url,
        config.key.get_secret_value(),
        cache=out / CACHE_FILE,
        progress=config.progress,
        cache_namespace=config.cache_namespace,
    )


def victim_input(metadata: dict[str, Any], model: str, kind: str, needed_for: str = "") -> InputSpec:
    """The victim's input shape from its metadata, after checking it is a ``kind``."""
    if metadata["kind"] != kind:
        raise ValueError(
            f"{model!r} is a {metadata['kind']}, not an {kind}{needed_for}".replace("an c", "a c")
        )
    _, channels, height, width = metadata["inputs"][0]["shape"]
    return InputSpec(channels=channels, height=height, width=width)


def queries_record(planned: int, before: dict[str, Any], after: dict[str, Any], sent: int) -> dict[str, Any]:
    """Queries of a run: planned, spent (the server's usage after minus before), sent, cache hits."""
    return {
        "planned": planned,
        "spent": after["used"] - before["used"],
        "sent": sent,
        "cache_hits": planned - sent,
        "key_used": after["used"],
        "key_remaining": after.get("remaining"),
    }

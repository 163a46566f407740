"""What every stealing run shares (``steal_encoder``, ``steal_classifier``): the run folder's file
names, the attacker's query pool, the victim's local white-box checkpoint, the versions recorded."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from common.checkpoints import InputSpec, read_card
from common.datasets import ImageData, get_dataset, make_splits

RESULT_FILE = "result.json"
CACHE_FILE = "query_cache.sqlite"
SURROGATE_DIR = "surrogate"


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

"""What a defense costs honest users, measured on held-out data with the model's own weights.

Classifiers: accuracy with and without the defense, top-1 agreement of defended and undefended
answers, L1 distance and KL(undefended || defended) of the probability vectors. Encoders: mean cosine
of defended and undefended embeddings, and the accuracy of a benign user's linear probe trained and
tested on defended embeddings, next to the same probe on undefended ones.

The honest user is one key (``honest-user``) asking each image once, in batches of 256 as the API
would see them (probe-training images first, then the test images), so keyed noise is drawn as the
API would draw it for that user and a stateful defense (B4B) sees that user's coverage grow; its
state is kept in an embedded Redis (fakeredis) for the measurement. ``dataset`` picks the honest
user's task (default: the model's own dataset).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fakeredis
import torch
from pydantic import TypeAdapter, ValidationError

import defenses.output  # noqa: F401  (registers the output defenses)
from common.checkpoints import load_checkpoint
from common.datasets import ImageData, get_dataset, make_splits
from common.metrics import accuracy, agreement, extract_features, kl_divergence, l1_distance, linear_probe
from common.training import predict
from defenses.base import DefenseContext, DefensePipeline, image_digests
from defenses.state import DefenseStore

_SPEC = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_JSON = TypeAdapter(Any)


def parse_defense(text: str) -> dict[str, Any]:
    """``"reverse_sigmoid(beta=0.7, gamma=0.2)"`` -> ``{"name": "reverse_sigmoid", "beta": 0.7,
    "gamma": 0.2}``; values parse as JSON when they can, else stay text."""
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(f"cannot parse defense {text!r}; write name or name(param=value, ...)")
    spec: dict[str, Any] = {"name": match.group(1)}
    for item in filter(None, (part.strip() for part in (match.group(2) or "").split(","))):
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"expected param=value in {text!r}, got {item!r}")
        try:
            spec[name.strip()] = _JSON.validate_json(raw.strip())
        except ValidationError:
            spec[name.strip()] = raw.strip()
    return spec


def held_out(dataset: str, channels: int, size: tuple[int, int], n: int, root: Path | None) -> ImageData:
    """The first ``n`` test images of ``dataset``, adapted to the model's input."""
    test = get_dataset(dataset, "test", root=root)
    return test.subset(torch.arange(min(n, len(test)))).adapt(channels, size)


BATCH = 256


def defended(pipeline: DefensePipeline, *queries: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """The pipeline applied as the API would for the ``honest-user`` key, to each ``(outputs,
    images)`` in turn, in batches; stateful defenses keep their state in one embedded Redis."""

    async def run() -> list[torch.Tensor]:
        redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        store = DefenseStore(redis)
        answers = []
        for outputs, images in queries:
            chunks = []
            for start in range(0, len(images), BATCH):
                x = images[start : start + BATCH]
                y = outputs[start : start + BATCH]
                inputs = x.float().div(255) if x.dtype == torch.uint8 else x.float()
                context = DefenseContext(
                    "honest-user", "cost", image_digests(x.numpy()), b"cost", inputs=inputs
                )
                if pipeline.stateful:
                    await pipeline.observe(y, context, store)
                chunks.append(pipeline.apply(y, context))
            answers.append(torch.cat(chunks))
        await redis.aclose()
        return answers

    return asyncio.run(run())


def defense_cost(
    model_dir: str | Path,
    specs: Sequence[dict[str, Any]],
    n: int = 2000,
    probe_train_size: int = 5000,
    data_root: Path | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Cost of the pipeline ``specs`` on the model in ``model_dir`` (see the module docstring)."""
    model, card = load_checkpoint(model_dir)
    pipeline = DefensePipeline.from_specs(specs, card.kind)
    pipeline.bind(model, card, Path(model_dir))
    size = (card.input.height, card.input.width)
    dataset = dataset or card.dataset
    test = held_out(dataset, card.input.channels, size, n, data_root)
    result: dict[str, Any] = {
        "model": card.name,
        "kind": card.kind,
        "defense": repr(pipeline),
        "dataset": dataset,
        "images": len(test),
    }
    if card.kind == "classifier":
        p = torch.softmax(predict(model, test.images), dim=1)
        (q,) = defended(pipeline, (p, test.images))
        result |= {
            "accuracy": accuracy(p, test.labels),
            "defended_accuracy": accuracy(q, test.labels),
            "agreement": agreement(p, q),
            "l1": l1_distance(p, q),
            "kl": kl_divergence(p, q),
        }
        result["accuracy_drop"] = result["accuracy"] - result["defended_accuracy"]
        return result
    features = model.features_module()
    train = make_splits(dataset, root=data_root).attacker_pool
    train = train.subset(torch.arange(min(probe_train_size, len(train)))).adapt(card.input.channels, size)
    e_train, e_test = extract_features(features, train.images), extract_features(features, test.images)
    d_train, d_test = defended(pipeline, (e_train, train.images), (e_test, test.images))
    classes = len(train.classes)
    result |= {
        "cosine": torch.nn.functional.cosine_similarity(e_test, d_test, dim=1).mean().item(),
        "linear_probe": linear_probe(e_train, train.labels, e_test, test.labels, classes),
        "defended_linear_probe": linear_probe(d_train, train.labels, d_test, test.labels, classes),
    }
    result["linear_probe_drop"] = result["linear_probe"] - result["defended_linear_probe"]
    return result

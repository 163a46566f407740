"""How good a stolen encoder is: downstream probes on frozen features and fidelity to the victim.

As in the encoder-stealing papers (RDA, Wu et al., ECCV 2024; StolenEncoder, Liu et al., CCS 2022):

- downstream accuracy of frozen features, for each downstream set: a true linear probe, the kNN
  monitor of RDA's code (k = 200, temperature 0.5) and the small MLP (512-256) that RDA's code
  reports as "linear probing" (:mod:`common.metrics`). The probe trains on ``probe_train_size``
  labelled images of the set (for a dataset with an attacker pool, the pool; the victim never
  trained on it) and is tested on the set's test split;
- the same numbers for the victim (white-box, from its checkpoint: a reference outside the
  attacker's budget, never queried through the API) and the surrogate / victim ratio;
- fidelity of the surrogate's embeddings to the victim's on held-out test images: mean cosine,
  mean L2 distance, and L2 distance of the normalised embeddings; and, unchanged by a per-key affine
  map of the embeddings (B4B), linear CKA and the held-out R^2 of a linear map from the surrogate's
  embeddings to the victim's (:func:`fidelity_of`).

Every downstream set is adapted to the victim's input (channels, size) with
:meth:`common.datasets.ImageData.adapt`. :class:`EvalConfig` is also the ``encoder`` family's
evaluation spec in a scenario (``evaluation: {encoder: {...}}``); :class:`EncoderEvaluation` is
what :func:`evaluate_stealing` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.checkpoints import InputSpec
from common.datasets import DATASETS, ImageData, get_dataset, make_splits
from common.metrics import (
    embedding_fidelity,
    extract_features,
    knn_accuracy,
    linear_cka,
    linear_map_r2,
    linear_probe,
    mlp_probe,
)
from common.models import ImageModel

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class EvalConfig(BaseModel):
    """What to measure, and on how much data (defaults: the quick profile's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    downstream: list[str] = Field(
        default_factory=lambda: ["fashion_mnist", "mnist5k"], description="downstream datasets"
    )
    probe_train_size: int = Field(10_000, ge=10, description="labelled images a probe trains on")
    test_size: int | None = Field(None, ge=10, description="cap on test images per downstream set")
    fidelity_size: int = Field(2_000, ge=2, description="held-out images for embedding fidelity")
    probe_epochs: int = Field(100, ge=1)
    mlp_probe: bool = Field(True, description="also train RDA's MLP probe (512-256)")
    knn_k: int = Field(200, ge=1)
    knn_temperature: float = Field(0.5, gt=0)
    split_seed: int = Field(0, description="seed of make_splits (the victim's recipe uses 0)")
    data_root: Path | None = None

    @field_validator("downstream")
    @classmethod
    def _known_datasets(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in DATASETS:
                raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS.names())}")
        return value


Scores = dict[str, dict[str, float]]
"""``{downstream set: {metric: accuracy}}``."""


class Fidelity(BaseModel):
    """How close the surrogate's embeddings are to the victim's on held-out images: row by row
    (:func:`common.metrics.embedding_fidelity`: cosine, L2), and up to a change of space
    (:func:`fidelity_of`): linear CKA and the R^2 of a linear map from the surrogate's embeddings to
    the victim's (fitted on one half of the images, scored on the other). A defense that gives each
    key its own affine map of the embeddings (B4B) lowers the first two, not the last two. ``cka``
    and ``linear_r2`` are None in results written before they were measured."""

    cosine: float
    l2: float
    l2_normalised: float
    cka: float | None = None
    linear_r2: float | None = None


def fidelity_of(surrogate: torch.Tensor, victim: torch.Tensor) -> Fidelity:
    """:class:`Fidelity` of ``surrogate`` [N, D] to ``victim`` [N, D] embeddings of the same images
    (R^2: least-squares map fitted on the first half, scored on the second)."""
    return Fidelity(
        **embedding_fidelity(surrogate, victim),
        cka=linear_cka(surrogate, victim),
        linear_r2=linear_map_r2(surrogate, victim) if surrogate.shape[0] >= 4 else None,
    )


class EncoderEvaluation(BaseModel):
    """What :func:`evaluate_stealing` measured. ``victim``, ``ratio``, ``recovered`` and the
    fidelities need the victim's checkpoint; ``untrained`` and ``recovered`` an untrained surrogate."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    surrogate: Scores
    victim: Scores | None = None
    untrained: Scores | None = None
    no_query: Scores | None = Field(
        None, description="the attacker's no-query alternative (SimCLR on its own pool, same compute)"
    )
    ratio: Scores | None = Field(None, description="surrogate / victim")
    recovered: dict[str, dict[str, float | None]] | None = Field(
        None, description="share of the victim's gain over an untrained network recovered"
    )
    fidelity: Fidelity | None = None
    untrained_fidelity: Fidelity | None = None
    seconds: float


def _cap(data: ImageData, n: int | None) -> ImageData:
    return data if n is None or n >= len(data) else data.subset(torch.arange(n))


def downstream_data(name: str, spec: InputSpec, cfg: EvalConfig) -> tuple[ImageData, ImageData]:
    """(probe-training set, test set) of a downstream dataset, adapted to ``spec``.

    The training images come from the attacker's pool of :func:`common.datasets.make_splits`
    (disjoint from the victim's private training data), the test images from the test split.
    """
    try:
        train = make_splits(name, root=cfg.data_root, seed=cfg.split_seed).attacker_pool
    except ValueError:
        train = get_dataset(name, "train", root=cfg.data_root)
    test = get_dataset(name, "test", root=cfg.data_root)
    size = (spec.height, spec.width)
    return (
        _cap(train, cfg.probe_train_size).adapt(spec.channels, size),
        _cap(test, cfg.test_size).adapt(spec.channels, size),
    )


def features_of(model: ImageModel, device: torch.device) -> FeatureFn:
    """The representation of ``model`` (``model.features``) as a batched function of uint8 images."""
    module = model.features_module().to(device)
    return lambda images: extract_features(module, images, device=device)


def probe_scores(
    features: FeatureFn, train: ImageData, test: ImageData, cfg: EvalConfig, device: torch.device
) -> dict[str, float]:
    """Linear probe, kNN and (optionally) MLP-probe accuracy of frozen ``features``."""
    f_train, f_test = features(train.images), features(test.images)
    classes = len(train.classes)
    scores = {
        "linear_probe": linear_probe(
            f_train, train.labels, f_test, test.labels, classes, epochs=cfg.probe_epochs, device=device
        ),
        "knn": knn_accuracy(
            f_train, train.labels, f_test, test.labels, classes, k=cfg.knn_k, temperature=cfg.knn_temperature
        ),
    }
    if cfg.mlp_probe:
        scores["mlp_probe"] = mlp_probe(
            f_train, train.labels, f_test, test.labels, classes, epochs=cfg.probe_epochs, device=device
        )
    return scores


def recovered_fraction(
    surrogate: dict[str, dict[str, float]],
    victim: dict[str, dict[str, float]],
    untrained: dict[str, dict[str, float]],
    min_gain: float = 0.02,
) -> dict[str, dict[str, float | None]]:
    """``(surrogate - untrained) / (victim - untrained)`` per set and metric: the share of what the
    victim's training added over a random network that the attack recovered (``None`` where the
    victim adds less than ``min_gain``: the ratio would be noise)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, scores in surrogate.items():
        out[name] = {}
        for metric, value in scores.items():
            gain = victim[name][metric] - untrained[name][metric]
            out[name][metric] = (value - untrained[name][metric]) / gain if gain >= min_gain else None
    return out


def evaluate_stealing(
    surrogate: ImageModel,
    spec: InputSpec,
    cfg: EvalConfig,
    victim: ImageModel | None = None,
    untrained: ImageModel | None = None,
    device: torch.device | None = None,
    no_query: ImageModel | None = None,
    known: dict[str, Scores] | None = None,
) -> EncoderEvaluation:
    """Downstream scores of the surrogate (and of the victim, an untrained surrogate and the
    attacker's no-query alternative (:mod:`attacker_client.no_query`) when given), their ratios
    (surrogate / victim), the share of the victim's gain recovered (:func:`recovered_fraction`), and
    fidelity to the victim (:class:`EncoderEvaluation`).

    ``known``: scores of reference roles (``victim``, ``untrained``, ``no_query``) already measured
    with the same evaluation config (the range's reference cache): taken as they are, their probes
    not trained again (the models are still needed for fidelity)."""
    device = device or torch.device("cpu")
    started = time.perf_counter()
    known = known or {}
    models = {"surrogate": surrogate, "victim": victim, "untrained": untrained, "no_query": no_query}
    features = {role: features_of(model, device) for role, model in models.items() if model is not None}
    result: dict[str, Any] = {role: None for role in (*models, "ratio", "recovered", "fidelity")}
    result["untrained_fidelity"] = None
    for role in features:
        result[role] = dict(known[role]) if role in known else {}
    first_test: ImageData | None = None
    for name in cfg.downstream:
        train, test = downstream_data(name, spec, cfg)
        first_test = test if first_test is None else first_test
        for role, fn in features.items():
            if role not in known or name not in known[role]:
                result[role][name] = probe_scores(fn, train, test, cfg, device)
    if victim is not None:
        result["ratio"] = {
            name: {
                metric: value / max(result["victim"][name][metric], 1e-12) for metric, value in scores.items()
            }
            for name, scores in result["surrogate"].items()
        }
        if untrained is not None:
            result["recovered"] = recovered_fraction(
                result["surrogate"], result["victim"], result["untrained"]
            )
        if first_test is not None:
            held_out = _cap(first_test, cfg.fidelity_size).images
            reference = features["victim"](held_out)
            result["fidelity"] = fidelity_of(features["surrogate"](held_out), reference)
            if untrained is not None:
                result["untrained_fidelity"] = fidelity_of(features["untrained"](held_out), reference)
    result["seconds"] = time.perf_counter() - started
    return EncoderEvaluation.model_validate(result)

"""The encoder family's references: the no-query alternative and the cache of reference scores."""

from __future__ import annotations

from pathlib import Path

import torch

from attacker_client.evaluate import EvalConfig, evaluate_stealing
from attacker_client.no_query import train_no_query_alternative
from attacker_client.runs import ReferenceCache
from common.checkpoints import InputSpec
from common.datasets import make_synthetic
from common.models import build_model
from common.training import TrainConfig


def test_reference_cache_round_trip(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path / "refs")
    key = {"role": "victim", "version": "abc", "eval": {"downstream": ["x"]}}
    assert cache.get(key) is None
    cache.put(key, {"x": {"linear_probe": 0.5}})
    assert cache.get(key) == {"x": {"linear_probe": 0.5}}
    assert cache.get({**key, "version": "abd"}) is None
    next(iter((tmp_path / "refs").glob("*.json"))).write_text("{not json")
    assert cache.get(key) is None  # a corrupt entry is measured again


def test_no_query_alternative_is_seeded_and_trains_the_given_steps() -> None:
    pool = make_synthetic(64, seed=0)
    cfg = TrainConfig(epochs=10**6, batch_size=16, max_steps=3, optimizer="adam", lr=1e-3, seed=1)
    a = train_no_query_alternative(pool, "small_cnn", 32, cfg, progress=False)
    b = train_no_query_alternative(pool, "small_cnn", 32, cfg, progress=False)
    untrained = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=32)
    x = pool.to_float()[:8]
    with torch.no_grad():
        assert torch.equal(a.features(x), b.features(x))
        assert not torch.allclose(a.features(x), untrained.features(x))
    assert a.feature_dim == 32


def test_known_reference_scores_are_not_measured_again() -> None:
    cfg = EvalConfig(
        downstream=["synthetic"],
        probe_train_size=32,
        test_size=32,
        fidelity_size=16,
        probe_epochs=2,
        mlp_probe=False,
    )
    spec = InputSpec(channels=1, height=28, width=28)
    surrogate = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=16)
    victim = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=16)
    known = {"victim": {"synthetic": {"linear_probe": 0.123, "knn": 0.456}}}
    evaluation = evaluate_stealing(surrogate, spec, cfg, victim, None, torch.device("cpu"), known=known)
    assert evaluation.victim == known["victim"]  # taken as it is
    assert evaluation.fidelity is not None  # the victim model still serves fidelity
    no_query = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=16)
    with_baseline = evaluate_stealing(
        surrogate, spec, cfg, None, None, torch.device("cpu"), no_query=no_query
    )
    assert with_baseline.no_query is not None and "synthetic" in with_baseline.no_query

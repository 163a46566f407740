"""Stateless output defenses: validation, properties (hypothesis) and literal reference formulas."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import defenses.output  # noqa: F401  (registers the defenses)
from defenses.base import DEFENSES, DefenseContext, DefensePipeline, build_defense, image_digests

CLASSIFIER_DEFENSES = [
    {"name": "label_only"},
    {"name": "top_k", "k": 2},
    {"name": "reverse_sigmoid", "beta": 0.7, "gamma": 0.2},
    {"name": "probability_noise", "scale": 0.05},
    {"name": "probability_noise", "scale": 0.05, "distribution": "laplace"},
    {"name": "high_confidence", "cutoff": 0.3},
]
ENCODER_DEFENSES = [
    {"name": "embedding_noise", "sigma": 0.2},
    {"name": "embedding_rounding", "decimals": 1},
    {"name": "embedding_top_k", "k": 3},
]


def context(n: int, key: str = "k1", seed: int = 0) -> DefenseContext:
    images = np.random.default_rng(seed).integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)
    return DefenseContext(key_id=key, model="m", digests=image_digests(images), secret=b"s3cret")


probabilities = st.integers(1, 6).flatmap(
    lambda n: st.integers(2, 10).flatmap(
        lambda c: st.lists(st.floats(-8, 8), min_size=n * c, max_size=n * c).map(
            lambda v: torch.softmax(torch.tensor(v, dtype=torch.float32).view(n, c), dim=1)
        )
    )
)


def test_registry_knows_every_defense() -> None:
    assert set(DEFENSES.names()) >= {d["name"] for d in CLASSIFIER_DEFENSES + ENCODER_DEFENSES} | {"rounding"}
    with pytest.raises(ValueError, match="unknown defense"):
        build_defense({"name": "nope"})
    with pytest.raises(pydantic.ValidationError):
        build_defense({"name": "top_k", "k": 0})
    with pytest.raises(pydantic.ValidationError, match="extra"):
        build_defense({"name": "reverse_sigmoid", "betta": 1})
    with pytest.raises(ValueError, match="does not apply to encoder"):
        DefensePipeline.from_specs([{"name": "label_only"}], "encoder")


@settings(max_examples=40, deadline=None)
@given(p=probabilities, spec_index=st.integers(0, len(CLASSIFIER_DEFENSES) - 1))
def test_classifier_defenses_answer_distributions(p: torch.Tensor, spec_index: int) -> None:
    q = build_defense(CLASSIFIER_DEFENSES[spec_index]).apply(p, context(len(p)))
    assert q.shape == p.shape and torch.isfinite(q).all()
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(len(p)), atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(p=probabilities, k=st.integers(1, 4))
def test_label_only_and_top_k_keep_the_argmax(p: torch.Tensor, k: int) -> None:
    ctx = context(len(p))
    argmax = p.argmax(dim=1)
    assert build_defense({"name": "label_only"}).apply(p, ctx).argmax(dim=1).tolist() == argmax.tolist()
    q = build_defense({"name": "top_k", "k": k}).apply(p, ctx)
    assert q.argmax(dim=1).tolist() == argmax.tolist()
    assert ((q > 0).sum(dim=1) <= k).all()
    cut = build_defense({"name": "high_confidence", "cutoff": 0.9}).apply(p, ctx)
    assert cut.argmax(dim=1).tolist() == argmax.tolist()


def test_reverse_sigmoid_matches_the_formula() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]], dtype=torch.float64)
    beta, gamma = 0.7, 0.2
    expected = []
    for row in p.tolist():
        q = []
        for v in row:
            c = min(max(v, 1e-9), 1 - 1e-9)
            r = beta * (1 / (1 + math.exp(gamma * math.log((1 - c) / c))) - 0.5)
            q.append(min(max(v - r, 0.0), 1.0))
        expected.append([v / sum(q) for v in q])
    got = build_defense({"name": "reverse_sigmoid", "beta": beta, "gamma": gamma}).apply(p, context(2))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_rounding_and_top_k_formulas() -> None:
    p = torch.tensor([[0.12345, 0.5, 0.37655]])
    torch.testing.assert_close(
        build_defense({"name": "rounding", "decimals": 2}).apply(p, context(1)),
        torch.tensor([[0.12, 0.5, 0.38]]),
    )
    torch.testing.assert_close(
        build_defense({"name": "top_k", "k": 2}).apply(p, context(1)),
        torch.tensor([[0.0, 0.5 / 0.87655, 0.37655 / 0.87655]]),
    )
    e = torch.tensor([[0.5, -3.0, 1.0, 2.0]])
    torch.testing.assert_close(
        build_defense({"name": "embedding_top_k", "k": 2}).apply(e, context(1)),
        torch.tensor([[0.0, -3.0, 0.0, 2.0]]),
    )
    torch.testing.assert_close(
        build_defense({"name": "embedding_rounding", "step": 0.5}).apply(
            torch.tensor([[0.26, -0.74]]), context(1)
        ),
        torch.tensor([[0.5, -0.5]]),
    )


@pytest.mark.parametrize("spec", [CLASSIFIER_DEFENSES[3], CLASSIFIER_DEFENSES[4], ENCODER_DEFENSES[0]])
def test_noise_is_deterministic_per_key_and_image(spec: dict[str, object]) -> None:
    defense = build_defense(spec)
    x = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    first = defense.apply(x, context(4, key="alice"))
    torch.testing.assert_close(defense.apply(x, context(4, key="alice")), first, rtol=0, atol=0)
    assert not torch.allclose(defense.apply(x, context(4, key="bob")), first)
    # Another image (another digest) in the same position gets other noise.
    assert not torch.allclose(defense.apply(x, context(4, key="alice", seed=1)), first)


def test_embedding_noise_scales_with_the_embedding() -> None:
    e = torch.randn(256, 32, generator=torch.Generator().manual_seed(1)) * 10
    noisy = build_defense({"name": "embedding_noise", "sigma": 0.1}).apply(e, context(256))
    rms = e.norm(dim=1) / math.sqrt(32)
    ratio = ((noisy - e).std(dim=1) / rms).mean().item()
    assert ratio == pytest.approx(0.1, rel=0.15)


def test_pipeline_applies_in_order() -> None:
    pipeline = DefensePipeline.from_specs(
        [{"name": "reverse_sigmoid"}, {"name": "top_k", "k": 1}], "classifier"
    )
    p = torch.tensor([[0.6, 0.3, 0.1]])
    torch.testing.assert_close(pipeline.apply(p, context(1)), torch.tensor([[1.0, 0.0, 0.0]]))
    assert "reverse_sigmoid" in repr(pipeline) and not DefensePipeline()

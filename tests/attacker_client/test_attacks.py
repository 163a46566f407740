"""The encoder attacks with an in-process oracle: query plans, prototypes, parameters, determinism."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from attacker_client.attacks import ATTACKS, build_attack
from attacker_client.attacks.base import EncoderAttack, view_generator
from attacker_client.attacks.rda import RDA, build_prototypes
from common.datasets import make_synthetic
from common.metrics import extract_features
from common.models import build_model
from common.params import parse_params

DIM = 16


class CountingOracle:
    """A fixed random small CNN as the victim; records every batch of images it is asked."""

    def __init__(self) -> None:
        torch.manual_seed(123)
        self.model = build_model("encoder", "small_cnn", 1, [0.5], [0.5], feature_dim=DIM).features_module()
        self.calls: list[np.ndarray] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.ndim == 4
        self.calls.append(images.copy())
        return extract_features(self.model, torch.from_numpy(images)).numpy()

    @property
    def asked(self) -> int:
        return sum(len(c) for c in self.calls)


POOL = make_synthetic(64, size=28, seed=5)
CPU = torch.device("cpu")
TINY = {"epochs": 2, "batch_size": 8, "max_steps": 3}


def test_one_registry_holds_every_family_and_rejects_unknowns() -> None:
    families = {name: cls.family for name, cls in ATTACKS.items()}
    assert families == {
        "cont_steal": "encoder",
        "cont_steal_once": "encoder",
        "conventional": "encoder",
        "rda": "encoder",
        "stolen_encoder": "encoder",
        "knockoff": "classifier",
        "ensemble": "classifier",
        "rrm": "robustness",
    }
    assert isinstance(build_attack("stolen-encoder", {}, EncoderAttack), EncoderAttack)
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("nope")
    with pytest.raises(ValueError, match="knockoff is an attack of the classifier family"):
        build_attack("knockoff", {}, EncoderAttack)


def test_parameters_are_validated_at_construction() -> None:
    attack = build_attack("rda")
    p = attack.params
    assert (p.n_views, p.train_views, p.temperature, p.alpha, p.beta) == (10, 5, 0.07, 1.0, 1.0)
    assert (p.lr, p.weight_decay, p.batch_size, p.epochs) == (1e-3, 1e-4, 100, 100)
    stolen = build_attack("stolen_encoder").params
    assert (stolen.aug_weight, stolen.loss, stolen.normalize) == (20.0, "mse", True)
    assert stolen.train_view == "rda_train"
    cont = build_attack("cont_steal").params
    assert (cont.temperature, cont.query_view, cont.train_view, cont.cross_anchor) == (
        0.07,
        "rda_train",
        "rda_train",
        "victim",
    )
    with pytest.raises(pydantic.ValidationError, match="extra"):
        build_attack("rda", {"n_view": 3})
    with pytest.raises(pydantic.ValidationError):
        build_attack("rda", {"temperature": 0})
    with pytest.raises(pydantic.ValidationError, match="architecture"):
        build_attack("rda", {"architecture": "vgg99"})


def test_budget_decides_the_number_of_samples() -> None:
    rda = build_attack("rda")
    assert rda.samples_for(95, 1000) == 9  # 9 samples x 10 views = 90 queries <= 95
    assert rda.samples_for(10_000, 64) == 64  # capped by the pool
    assert build_attack("conventional", {"epochs": 4}).samples_for(100, 1000) == 25
    with pytest.raises(ValueError, match="at least 2"):
        rda.samples_for(15, 1000)


def test_prototypes_are_averaged_normalised_embeddings() -> None:
    e = torch.randn(3, 4, 5, dtype=torch.float64) * 3
    expected = torch.stack([sum(e[i, v] / e[i, v].norm() for v in range(4)) / 4 for i in range(3)])
    torch.testing.assert_close(build_prototypes(e), expected.float())
    assert (build_prototypes(e).norm(dim=1) <= 1 + 1e-6).all()  # not re-normalised


def test_rda_queries_every_view_once_before_training() -> None:
    oracle = CountingOracle()
    attack = RDA(n_views=4, **TINY)
    samples = attack.choose_samples(POOL, budget=50)  # 12 samples x 4 views
    prototypes, embeddings = attack.prototypes(oracle, samples)
    assert oracle.asked == 12 * 4 and embeddings.shape == (12, 4, DIM) and prototypes.shape == (12, DIM)
    views = np.concatenate(oracle.calls).reshape(12, 4, 1, 28, 28)
    assert len({v.tobytes() for v in views.reshape(48, -1)}) == 48  # every view differs
    torch.testing.assert_close(prototypes, F.normalize(embeddings, dim=2).mean(dim=1))
    # The same seed asks for the same bytes again (so a cache answers a rerun).
    again = CountingOracle()
    RDA(n_views=4, **TINY).prototypes(again, RDA(n_views=4, **TINY).choose_samples(POOL, 50))
    np.testing.assert_array_equal(np.concatenate(again.calls), np.concatenate(oracle.calls))


@pytest.mark.parametrize(
    ("name", "params", "budget", "expected_queries"),
    [
        ("rda", {"n_views": 3, "train_views": 2}, 60, 60),
        ("stolen_encoder", {}, 40, 40),
        # Fresh views every step: 64 samples fit, max_steps 3 x batch 8 = 24 queries.
        ("cont_steal", {}, 40, 24),
        ("cont_steal_once", {"query_views": 2}, 40, 40),
        ("stolen_encoder", {"normalize": False, "train_view": "stolen_encoder"}, 40, 40),
        # 4 epochs of 10 samples planned; max_steps 3 at 1 step per epoch runs 3 epochs: 30 queries.
        ("conventional", {"epochs": 4, "batch_size": 10}, 40, 30),
    ],
)
def test_each_attack_trains_a_surrogate_within_budget(
    name: str, params: dict[str, object], budget: int, expected_queries: int
) -> None:
    oracle = CountingOracle()
    result = build_attack(name, {**TINY, **params}).steal(oracle, POOL, budget, CPU, progress=False)
    assert oracle.asked == result.queries == expected_queries <= budget
    assert result.surrogate.feature_dim == DIM
    assert len(result.history) >= 1 and all(np.isfinite(h["loss"]) for h in result.history)
    with torch.no_grad():
        assert result.surrogate.features(torch.rand(2, 1, 28, 28)).shape == (2, DIM)


def test_rda_is_reproducible_on_cpu() -> None:
    runs = [
        build_attack("rda", {**TINY, "n_views": 2, "train_views": 2}).steal(
            CountingOracle(), POOL, 40, CPU, progress=False
        )
        for _ in range(2)
    ]
    for a, b in zip(
        runs[0].surrogate.state_dict().values(), runs[1].surrogate.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rda_learns_the_victim() -> None:
    """Twenty-four steps make the surrogate's embeddings far closer to the victim's than at init.

    A cosine schedule: at a constant lr the held-out cosine of so short a run swings between 0.4 and
    0.9 with the CPU's float rounding; annealed it lands near 0.9 on every machine tried.
    """
    oracle = CountingOracle()
    attack = build_attack(
        "rda",
        {"epochs": 6, "batch_size": 16, "n_views": 4, "train_views": 2, "lr": 2e-3, "schedule": "cosine"},
    )
    untrained = attack.build_surrogate(POOL, DIM)
    result = attack.steal(oracle, POOL, 256, CPU, progress=False)
    held_out = make_synthetic(100, seed=9).images
    victim = extract_features(oracle.model, held_out)

    def cosine(model: torch.nn.Module) -> float:
        return F.cosine_similarity(extract_features(model.features_module(), held_out), victim).mean().item()

    assert cosine(result.surrogate) > cosine(untrained) + 0.5


def test_cli_param_parsing() -> None:
    assert parse_params(["epochs=3", "train-view=none", "lr=1e-3", "schedule=cosine"]) == {
        "epochs": 3,
        "train_view": "none",
        "lr": 1e-3,
        "schedule": "cosine",
    }
    with pytest.raises(Exception, match="name=value"):
        parse_params(["epochs"])


def test_none_preset_gives_the_clean_image() -> None:
    views = EncoderAttack.make_views(POOL.images[:3], 2, view_generator("none"), torch.Generator())
    assert torch.equal(views, POOL.images[:3].unsqueeze(1).expand(3, 2, 1, 28, 28))
    result = build_attack("stolen_encoder", {**TINY, "train_view": "none"}).steal(
        CountingOracle(), POOL, 16, CPU, progress=False
    )
    assert result.queries == 16


def test_cont_steal_plans_its_samples_by_the_fresh_views_it_will_ask() -> None:
    attack = build_attack("cont_steal", {"epochs": 3, "batch_size": 8})
    assert attack.queries_per_sample() == 3
    # 15 samples: one batch of 8 per epoch (the partial batch dropped) x 3 epochs = 24 <= 40; 16 would
    # make two batches per epoch, 48 queries.
    assert attack.samples_for(40, 64) == 15
    assert (attack.planned_queries(15), attack.planned_queries(16)) == (24, 48)
    assert attack.samples_for(10_000, 64) == 64  # capped by the pool
    assert build_attack("cont_steal", TINY).samples_for(40, 64) == 64  # max_steps 3: 24 queries at most
    with pytest.raises(ValueError, match="does not buy"):
        attack.samples_for(5, 64)  # 2 samples x 3 epochs = 6 > 5


def test_cont_steal_queries_fresh_views_at_every_step() -> None:
    oracle = CountingOracle()
    result = build_attack("cont_steal", {"epochs": 3, "batch_size": 8}).steal(
        oracle, POOL, 40, CPU, progress=False
    )
    # One call per step (step 0's fetched before training to size the surrogate), 8 images each.
    assert [len(c) for c in oracle.calls] == [8, 8, 8]
    assert result.samples == 15 and result.queries == oracle.asked == 24 <= 40
    asked = np.concatenate(oracle.calls).reshape(24, -1)
    assert len({a.tobytes() for a in asked}) == 24  # every view is fresh
    clean = {img.tobytes() for img in POOL.images.numpy().reshape(64, -1)}
    assert not any(a.tobytes() in clean for a in asked)  # augmented, not the clean images
    # The same seed asks for the same bytes again (a cache answers a rerun).
    again = CountingOracle()
    build_attack("cont_steal", {"epochs": 3, "batch_size": 8}).steal(again, POOL, 40, CPU, progress=False)
    np.testing.assert_array_equal(np.concatenate(again.calls), np.concatenate(oracle.calls))


def test_cont_steal_never_asks_past_its_budget() -> None:
    from attacker_client.attacks.cont_steal import _StepQueries

    attack = build_attack("cont_steal", {"epochs": 1, "batch_size": 4})
    oracle = CountingOracle()
    queries = _StepQueries(attack, oracle, POOL, budget=6)  # type: ignore[arg-type]
    assert queries.fetch(torch.arange(4)).shape == (4, DIM)
    with pytest.raises(RuntimeError, match="budget"):
        queries.fetch(torch.arange(4, 8))
    assert oracle.asked == 4


def test_cont_steal_once_queries_before_training() -> None:
    oracle = CountingOracle()
    result = build_attack("cont_steal_once", {**TINY, "query_views": 2}).steal(
        oracle, POOL, 40, CPU, progress=False
    )
    assert len(oracle.calls) == 1 and result.queries == oracle.asked == 40  # 20 samples x 2 views

"""Defense pipelines served by the API: per model, per tier, keyed noise, bad configs stop startup."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.wire import decode_infer_response, infer_request
from defenses.config import DefenseConfig, write_defense_config
from server.app import create_app
from server.registry import ModelStoreError
from tests.conftest import create_key, make_settings


@pytest.fixture
def defended_store(model_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    write_defense_config(
        store / "clf",
        DefenseConfig(
            default=[{"name": "label_only"}], tiers={"research": [{"name": "rounding", "decimals": 1}]}
        ),
    )
    write_defense_config(store / "enc", DefenseConfig(default=[{"name": "embedding_noise", "sigma": 0.5}]))
    return store


def ask(client: TestClient, headers: dict[str, str], model: str, x: np.ndarray, output: str) -> np.ndarray:
    body, extra = infer_request(x, [output], binary=True)
    response = client.post(f"/v2/models/{model}/infer", content=body, headers={**headers, **extra})
    assert response.status_code == 200, response.text
    return decode_infer_response(response.content, response.headers.get("inference-header-content-length"))[
        output
    ]


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def test_pipeline_per_model_and_tier(defended_store: Path, model_store: Path) -> None:
    x = images(6)
    with TestClient(create_app(make_settings(model_store, None))) as plain:
        _, headers = create_key(plain, tier="research")
        reference = ask(plain, headers, "clf", x, "probabilities")
    with TestClient(create_app(make_settings(defended_store, None, expose_defense=True))) as client:
        _, standard = create_key(client)
        probabilities = ask(client, standard, "clf", x, "probabilities")
        np.testing.assert_array_equal(probabilities, np.eye(10, dtype=np.float32)[reference.argmax(1)])
        np.testing.assert_array_equal(ask(client, standard, "clf", x, "label"), reference.argmax(1))
        _, research = create_key(client, tier="research")
        np.testing.assert_allclose(
            ask(client, research, "clf", x, "probabilities"), reference.round(1), atol=1e-6
        )
        body, extra = infer_request(x, ["probabilities"], binary=True)
        response = client.post("/v2/models/clf/infer", content=body, headers={**standard, **extra})
        assert response.headers["x-stealrange-defense"] == "label_only()"


def test_encoder_noise_is_keyed_and_repeatable(defended_store: Path) -> None:
    x = images(4, seed=1)
    with TestClient(create_app(make_settings(defended_store, None))) as client:
        _, alice = create_key(client)
        _, bob = create_key(client)
        first = ask(client, alice, "enc", x, "embedding")
        np.testing.assert_array_equal(ask(client, alice, "enc", x, "embedding"), first)
        assert not np.allclose(ask(client, bob, "enc", x, "embedding"), first)
        body, extra = infer_request(x, ["embedding"], binary=True)
        assert (
            "x-stealrange-defense"
            not in client.post("/v2/models/enc/infer", content=body, headers={**alice, **extra}).headers
        )  # off by default


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"default": [{"name": "nope"}]}', "unknown defense"),
        ('{"default": [{"name": "top_k", "k": 0}]}', "greater than or equal to 1"),
        ('{"default": [{"name": "embedding_noise"}]}', "does not apply to classifier"),
        ('{"defaults": []}', "Extra inputs"),
        ("{not json", "invalid defense config"),
    ],
)
def test_bad_defense_config_stops_startup(defended_store: Path, config: str, message: str) -> None:
    (defended_store / "clf" / "defenses.json").write_text(config)
    with pytest.raises(ModelStoreError, match=message):
        create_app(make_settings(defended_store, None))

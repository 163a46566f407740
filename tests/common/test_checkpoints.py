"""Tests of common.checkpoints: safetensors + card round trip, sha256 checks, card validation."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.checkpoints import (
    CARD_FILE,
    WEIGHTS_FILE,
    InputSpec,
    ModelCard,
    card_for,
    load_checkpoint,
    read_card,
    save_checkpoint,
    sha256_file,
)
from common.models import ImageModel, build_model

SPEC = InputSpec(channels=1, height=28, width=28)
CLASSES = [f"c{i}" for i in range(10)]


def _tiny(kind: str) -> ImageModel:
    torch.manual_seed(0)
    model = build_model(kind, "small_cnn", 1, [0.25], [0.5], feature_dim=32, projection_dim=8)  # type: ignore[arg-type]
    # Move BatchNorm running statistics away from their defaults, so the round trip covers buffers.
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 1, 28, 28))
    return model.eval()


def _card(model: ImageModel, name: str = "tiny", **fields: Any) -> ModelCard:
    if model.kind == "classifier":
        fields.setdefault("classes", CLASSES)
    return card_for(model, name, "small_cnn", input=SPEC, dataset="synthetic", **fields)


def _card_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": "clf",
        "kind": "classifier",
        "architecture": "small_cnn",
        "input": {"channels": 3, "height": 32, "width": 32},
        "mean": [0.5, 0.5, 0.5],
        "std": [0.2, 0.2, 0.2],
        "classes": ["a", "b"],
        "feature_dim": 512,
    }
    fields.update(overrides)
    return fields


@pytest.mark.parametrize("kind", ["classifier", "encoder"])
def test_round_trip_identical_outputs_and_card(tmp_path: Path, kind: str):
    model = _tiny(kind)
    saved = save_checkpoint(model, _card(model, metrics={"accuracy": 0.5}), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    assert saved.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert saved.sha256 == sha256_file(weights)

    loaded, card = load_checkpoint(tmp_path / "ckpt")
    assert card == saved
    assert card == read_card(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.kind == kind
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.features(x), model.features(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_card_records_model(tmp_path: Path):
    model = _tiny("encoder")
    card = _card(model)
    assert card.kind == "encoder"
    assert card.mean == [0.25]
    assert card.std == [0.5]
    assert card.feature_dim == 32
    assert card.projection_dim == 8
    on_disk = json.loads(save_checkpoint(model, card, tmp_path).model_dump_json())
    assert json.loads((tmp_path / CARD_FILE).read_text()) == on_disk


def test_weights_are_plain_safetensors(tmp_path: Path):
    model = _tiny("classifier")
    save_checkpoint(model, _card(model), tmp_path)
    path = tmp_path / WEIGHTS_FILE
    # safetensors layout: 8-byte little-endian header length, then a JSON header.
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"] == {"name": "tiny", "kind": "classifier"}
    assert not raw.startswith(b"\x80")  # no pickle protocol marker
    tensors = load_file(str(path))
    state = model.state_dict()
    assert set(tensors) == set(state)
    for key, value in state.items():
        assert torch.equal(tensors[key], value), key
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"name": "tiny", "kind": "classifier"}


def test_load_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = _tiny("classifier")
    save_checkpoint(model, _card(model), tmp_path)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling is not allowed")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.kind == "classifier"


def test_tampered_weights_are_rejected(tmp_path: Path):
    model = _tiny("classifier")
    save_checkpoint(model, _card(model), tmp_path)
    path = tmp_path / WEIGHTS_FILE
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # flip the bits of one weight byte
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(tmp_path)


def test_invalid_json_card_names_the_file(tmp_path: Path):
    model = _tiny("classifier")
    save_checkpoint(model, _card(model), tmp_path)
    (tmp_path / CARD_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"card\.json") as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path / CARD_FILE) in str(info.value)


def test_card_failing_validation_names_the_file(tmp_path: Path):
    (tmp_path / CARD_FILE).write_text(json.dumps(_card_fields(kind="regressor")))
    with pytest.raises(ValueError) as info:
        read_card(tmp_path)
    assert str(tmp_path / CARD_FILE) in str(info.value)


def test_missing_card_is_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_card(tmp_path)


def test_valid_card_fields():
    card = ModelCard(**_card_fields())
    assert card.num_classes == 2
    assert card.input.shape == (3, 32, 32)


@pytest.mark.parametrize(
    "overrides",
    [
        {"mean": [0.5]},
        {"std": [0.2, 0.2]},
        {"mean": [0.5] * 4, "std": [0.2] * 4},
        {"classes": []},
        {"classes": ["only"]},
        {"name": "Upper"},
        {"name": "-leading-dash"},
        {"name": "has space"},
        {"name": ""},
        {"name": "a" * 65},
        {"unknown_field": 1},
        {"input": {"channels": 0, "height": 32, "width": 32}},
        {"tiers": {"standard": ["everything"]}},
    ],
)
def test_invalid_cards_are_rejected(overrides: dict[str, Any]):
    with pytest.raises(pydantic.ValidationError):
        ModelCard(**_card_fields(**overrides))


@pytest.mark.parametrize("name", ["a", "clf", "enc-v2", "resnet18.cifar_10", "0" + "x" * 63])
def test_valid_names(name: str):
    assert ModelCard(**_card_fields(name=name)).name == name


def test_encoder_card_needs_no_classes():
    card = ModelCard(**_card_fields(kind="encoder", classes=[]))
    assert card.num_classes == 0
    assert card.output_modes == ("embedding",)


def test_modes_for_tier_restricts_to_the_kind():
    clf = ModelCard(**_card_fields())
    enc = ModelCard(**_card_fields(kind="encoder", classes=[]))
    assert clf.modes_for_tier("label") == ["label"]
    assert clf.modes_for_tier("standard") == ["label", "top_k", "probabilities"]
    assert clf.modes_for_tier("research") == ["label", "top_k", "probabilities", "logits"]
    assert enc.modes_for_tier("label") == []
    assert enc.modes_for_tier("standard") == ["embedding"]
    assert enc.modes_for_tier("research") == ["embedding"]
    assert clf.modes_for_tier("no_such_tier") == []
    custom = ModelCard(**_card_fields(tiers={"gold": ["embedding", "logits"]}))
    assert custom.modes_for_tier("gold") == ["logits"]

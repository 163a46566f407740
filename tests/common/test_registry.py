"""Tests of common.registry: the generic registry and the params-checking base of every plugin."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from pydantic import Field, ValidationError

from common.registry import Configurable, Params, Registry


class ToyParams(Params):
    width: int = Field(3, ge=1, description="a positive width")
    label: str = "toy"


class Toy(Configurable):
    name = "toy_plugin"
    paper = "Nobody, A Toy, 2024"
    Params = ToyParams


@pytest.fixture
def registry() -> Registry[type[Configurable]]:
    toys = Registry[type[Configurable]]("toy")
    toys.register(Toy)
    return toys


def test_register_returns_the_object_and_get_accepts_dash_underscore_and_case(registry) -> None:
    assert registry.get("toy_plugin") is Toy
    assert registry.get("toy-plugin") is Toy
    assert registry.get(" Toy-Plugin ") is Toy
    assert "TOY-PLUGIN" in registry and "nope" not in registry and 3 not in registry
    assert registry.names() == ["toy_plugin"] and list(registry) == ["toy_plugin"] and len(registry) == 1


def test_register_under_an_explicit_name_as_a_decorator(registry) -> None:
    @registry.register(name="Other-One")
    def factory(params: dict[str, Any] | None = None) -> Toy:
        return Toy(params)

    assert registry.get("other_one") is factory
    assert registry.names() == ["other_one", "toy_plugin"]
    assert registry.items() == [("other_one", factory), ("toy_plugin", Toy)]


def test_duplicate_registration_is_an_error_and_keeps_the_first(registry) -> None:
    class Impostor(Toy):
        name = "Toy-Plugin"

    with pytest.raises(ValueError, match="toy 'toy_plugin' is already registered"):
        registry.register(Impostor)
    assert registry.get("toy_plugin") is Toy


def test_unknown_name_lists_the_known_ones(registry) -> None:
    registry.register(name="second")(Toy)
    with pytest.raises(ValueError, match="unknown toy 'nope'; known: second, toy_plugin"):
        registry.get("nope")
    with pytest.raises(ValueError, match="known: none"):
        Registry[object]("empty").get("anything")


def test_build_checks_params(registry) -> None:
    toy = registry.build("toy-plugin", {"width": 5})
    assert isinstance(toy, Toy) and toy.params == ToyParams(width=5)
    assert registry.build("toy_plugin").params.width == 3
    assert registry.build("toy_plugin", {"width": 5}, label="x").params.label == "x"
    with pytest.raises(ValidationError, match="width"):
        registry.build("toy_plugin", {"width": 0})
    with pytest.raises(ValidationError, match="colour"):
        registry.build("toy_plugin", {"colour": "red"})  # unknown names are rejected
    with pytest.raises(ValueError, match="unknown toy"):
        registry.build("nope", {"width": 5})


def test_unregister(registry) -> None:
    registry.unregister("Toy-Plugin")
    assert "toy_plugin" not in registry and registry.names() == []
    registry.unregister("toy_plugin")  # removing what is absent is no error
    registry.register(Toy)  # and the name is free again
    assert registry.get("toy_plugin") is Toy


def test_configurable_params_overrides_repr_and_describe() -> None:
    toy = Toy(ToyParams(width=2), label="y")
    assert toy.params == ToyParams(width=2, label="y")
    assert Toy({"width": 4}).params.width == 4
    assert repr(toy) == "toy_plugin(width=2, label='y')"
    with pytest.raises(ValidationError):
        toy.params.width = 7  # frozen
    with pytest.raises(ValidationError, match="width"):
        Toy(width="wide")
    described = Toy.describe()
    assert described["name"] == "toy_plugin" and described["paper"] == "Nobody, A Toy, 2024"
    assert described["params"]["properties"]["width"]["description"] == "a positive width"


@pytest.mark.parametrize(
    ("module", "registry_name", "entry"),
    [
        ("common.models", "BACKBONES", "small_cnn"),
        ("common.datasets", "DATASETS", "synthetic"),
        ("defenses.base", "DEFENSES", "top_k"),
        ("defenses.training", "TEACHER_DEFENSES", "ast"),
        ("defenses.detectors", "DETECTORS", "prada"),
        ("attacker_client.uq", "UQ_METHODS", "swag"),
    ],
)
def test_every_plugin_kind_has_a_registry(module: str, registry_name: str, entry: str) -> None:
    import defenses.output  # noqa: F401  (registers the output defenses)

    found = getattr(importlib.import_module(module), registry_name)
    assert isinstance(found, Registry) and entry in found

"""One registry and one params-checking base for every plugin: models, datasets, attacks and their
families, UQ methods, output defenses, teachers, detectors.

:class:`Registry` is timm's decorator registry made generic: ``@REGISTRY.register`` files a class
(or a factory) under its ``name``; look-ups accept ``-`` and ``_`` alike and in any case, and an
unknown name is a ``ValueError`` that lists the known ones.

:class:`Configurable` is ART's declared-parameters pattern: a plugin declares its parameters as a
pydantic model (:class:`Params`: frozen, unknown names rejected) and they are checked when the
plugin is built, so a typo in a scenario or a ``defenses.json`` fails before any work is done.

    ATTACKS = Registry[type[Attack]]("attack")

    @ATTACKS.register
    class RDA(EncoderAttack):
        name = "rda"
        Params = RDAParams

    attack = ATTACKS.build("rda", {"epochs": 10})
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar, overload

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


def normalise(name: str) -> str:
    """The registry key of a name: stripped, lower case, ``-`` read as ``_``."""
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Name -> registered object (a class or a factory), filled by a decorator."""

    def __init__(self, what: str) -> None:
        self.what = what  # "attack", "defense", ...: used in error messages
        self._entries: dict[str, T] = {}

    @overload
    def register(self, obj: T, /) -> T: ...

    @overload
    def register(self, obj: None = None, /, *, name: str) -> Callable[[T], T]: ...

    def register(self, obj: T | None = None, /, *, name: str | None = None) -> T | Callable[[T], T]:
        """Decorator: file ``obj`` under ``name`` (default: its ``name`` attribute)."""

        def add(entry: T) -> T:
            key = normalise(name if name is not None else str(getattr(entry, "name")))  # noqa: B009
            if key in self._entries:
                raise ValueError(f"{self.what} {key!r} is already registered")
            self._entries[key] = entry
            return entry

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a plugin of their own clean up with it)."""
        self._entries.pop(normalise(name), None)

    def get(self, name: str) -> T:
        """The object registered as ``name``; a ``ValueError`` listing the known names otherwise."""
        key = normalise(name)
        if key not in self._entries:
            raise ValueError(f"unknown {self.what} {name!r}; known: {', '.join(self.names()) or 'none'}")
        return self._entries[key]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def build(self, name: str, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """``get(name)(params, **kwargs)``: build a registered :class:`Configurable` (params checked)."""
        factory: Any = self.get(name)
        return factory(params or {}, **kwargs)


class Params(BaseModel):
    """Base of every plugin's declared parameters: frozen, unknown names rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Configurable:
    """A plugin with declared parameters (:attr:`Params`), validated when it is built.

    ``Plugin(params, **overrides)``: ``params`` is a :class:`Params` instance or a dict;
    ``overrides`` update it; the result is validated against :attr:`Params` (a ``ValidationError``
    naming the field when it does not fit).
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = Params

    def __init__(self, params: BaseModel | dict[str, Any] | None = None, **overrides: Any) -> None:
        base = params.model_dump() if isinstance(params, BaseModel) else dict(params or {})
        self.params: Any = self.Params.model_validate({**base, **overrides})

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{self.name}({fields})"

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, paper and the parameters' JSON schema (``stealrange ... params NAME``)."""
        return {"name": cls.name, "paper": cls.paper, "params": cls.Params.model_json_schema()}

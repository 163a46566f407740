"""The root of every attack and the one registry of attacks by name.

Every attack, whatever it steals, is an :class:`Attack`: a :class:`common.registry.Configurable`
(its parameters declared as a pydantic :attr:`~Attack.Params` model, checked when it is built) with
a ``name``, a ``paper`` and the ``family`` it belongs to. A family (``encoder``, ``classifier``,
``robustness``; :mod:`attacker_client.families`) says what kind of victim its attacks steal, how
one of its runs goes over the network and what the run records; each family has a base class
deriving from :class:`Attack` (:class:`~attacker_client.attacks.base.EncoderAttack`,
:class:`~attacker_client.attacks.classifier.ClassifierAttack`,
:class:`~attacker_client.attacks.rrm.RobustRepresentationMatching`).

    @ATTACKS.register
    class RDA(EncoderAttack):
        name = "rda"
        Params = RDAParams

    attack = build_attack("rda", {"epochs": 10}, EncoderAttack)
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, TypeVar

from pydantic import Field

from common.registry import Configurable, Params, Registry

SURROGATE_MEAN = 0.5
"""Every surrogate (and RRM student) normalises its [0, 1] input with this mean and the std below, in
each channel: the attacker does not know the victim's normalisation and needs none of it."""
SURROGATE_STD = 0.5


class AttackParams(Params):
    """Parameters every attack has (each family and attack adds its own): the seed of its random
    choices. The range sets it per cell from the scenario's ``seeds``."""

    seed: int = Field(0, description="seeds the sample choice, the views and the surrogate's init")


class Attack(Configurable, abc.ABC):
    """The root of every attack: name, paper, family, parameters validated at construction."""

    family: ClassVar[str]
    """The name of the attack's family in :data:`attacker_client.families.FAMILIES`."""
    Params: ClassVar[type[AttackParams]] = AttackParams
    params: Any

    def queries_per_sample(self) -> int:
        """Victim queries each query sample costs over the whole attack (1 unless it asks for
        several views of a sample)."""
        return 1


ATTACKS = Registry[type[Attack]]("attack")
"""Every attack of every family by name: ``@ATTACKS.register``, ``ATTACKS.get("rrm")``."""

A = TypeVar("A", bound=Attack)


def build_attack(name: str, params: dict[str, Any] | None = None, base: type[A] = Attack) -> A:  # type: ignore[assignment]
    """The registered attack ``name`` built with ``params`` (validated), checked to be a ``base``
    (a run of one family refuses an attack of another with a ``ValueError``)."""
    cls = ATTACKS.get(name)
    if not issubclass(cls, base):
        raise ValueError(
            f"{cls.name} is an attack of the {cls.family} family, not of the {base.family} family"
        )
    return cls(params or {})

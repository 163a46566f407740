"""Attack families and their registry: what every family of attacks registers, and the three built in.

An attack (:class:`attacker_client.attacks.Attack`) names its ``family``; the family says

- ``kind``: the kind of victim its attacks steal (``encoder`` or ``classifier``), so the range
  meets each victim with the attacks of its kind;
- ``config``: its run config, a :class:`~attacker_client.runs.StealingRunConfig` (what every run
  shares) with an ``evaluation`` field holding its evaluation spec;
- ``evaluation``: that spec (a pydantic model), also what a scenario file holds under
  ``evaluation: {<family>: {...}}``;
- ``steal``: its run, from the config to its typed result (``None`` only on the ranks of a
  ``torchrun`` launch other than 0);
- ``result``: that result, a :class:`~attacker_client.runs.RunResult` whose ``family`` field is the
  ``Literal`` of the family's name; it carries what the report reads (success metric and its label,
  the surrogate's and the victim's quality, a table cell's text, notes under a victim's table);
- ``command`` (optional): builds the ``stealrange attack <name>`` command of one of its attacks.

The range, the report and the CLI go through this registry only: registering a family (and an
attack of it) in one module is all a new family takes.

    FAMILIES.register(AttackFamily(name="toy", kind="encoder", config=ToyConfig,
                                   evaluation=ToyEvalSpec, result=ToyResult, steal=steal_toy))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import BaseModel, Field, TypeAdapter

from attacker_client.attacks import ATTACKS, Attack
from attacker_client.commands import classifier_command, encoder_command, robustness_command
from attacker_client.evaluate import EvalConfig
from attacker_client.evaluate_classifier import ClassifierEvalSpec
from attacker_client.runs import RunResult, StealingRunConfig
from attacker_client.steal_classifier import ClassifierRunResult, ClassifierStealingConfig, steal_classifier
from attacker_client.steal_encoder import EncoderRunResult, EncoderStealingConfig, steal_encoder
from attacker_client.steal_robustness import (
    RobustnessEvalSpec,
    RobustnessRunResult,
    RobustnessStealingConfig,
    steal_robustness,
)
from common.models import ModelKind
from common.registry import Registry

ConfigT = TypeVar("ConfigT", bound=StealingRunConfig)
ResultT = TypeVar("ResultT", bound=RunResult)


@dataclass(frozen=True)
class AttackFamily(Generic[ConfigT, ResultT]):
    """One family of attacks (see the module docstring)."""

    name: str
    kind: ModelKind
    config: type[ConfigT]
    evaluation: type[BaseModel]
    result: type[ResultT]
    steal: Callable[[ConfigT], ResultT | None]
    command: Callable[[AttackFamily[Any, Any], type[Attack]], Callable[..., None]] | None = None

    def __post_init__(self) -> None:
        spec = self.config.model_fields.get("evaluation")
        if spec is None or spec.annotation is not self.evaluation:
            raise ValueError(
                f"family {self.name}: {self.config.__name__}.evaluation must be a {self.evaluation.__name__}"
            )
        tag = self.result.model_fields.get("family")
        if tag is None or tag.default != self.name:
            raise ValueError(
                f"family {self.name}: {self.result.__name__}.family must default to {self.name!r}"
            )

    def attacks(self) -> list[str]:
        """The registered attacks of this family."""
        return [name for name, cls in ATTACKS.items() if cls.family == self.name]

    def run(self, shared: StealingRunConfig, evaluation: BaseModel | dict[str, Any] | None = None) -> ResultT:
        """One run: the fields ``shared`` sets (url, key, served model, attack, params with the seed,
        query set and split, budget, run folder, device, victim checkpoint, data root, progress,
        cache namespace) and this family's ``evaluation`` spec (default: the spec's defaults)."""
        fields = {name: getattr(shared, name) for name in shared.model_fields_set}
        config = self.config.model_validate(
            {**fields, "evaluation": self.evaluation() if evaluation is None else evaluation}
        )
        result = self.steal(config)
        if result is None:
            raise RuntimeError(f"the {self.name} run returned no result (a rank other than 0 under torchrun)")
        return result


FAMILIES = Registry[AttackFamily[Any, Any]]("attack family")
"""Every attack family by name: ``FAMILIES.register(AttackFamily(...))``, ``FAMILIES.get("encoder")``."""

FAMILIES.register(
    AttackFamily(
        name="encoder",
        kind="encoder",
        config=EncoderStealingConfig,
        evaluation=EvalConfig,
        result=EncoderRunResult,
        steal=steal_encoder,
        command=encoder_command,
    )
)
FAMILIES.register(
    AttackFamily(
        name="classifier",
        kind="classifier",
        config=ClassifierStealingConfig,
        evaluation=ClassifierEvalSpec,
        result=ClassifierRunResult,
        steal=steal_classifier,
        command=classifier_command,
    )
)
FAMILIES.register(
    AttackFamily(
        name="robustness",
        kind="encoder",
        config=RobustnessStealingConfig,
        evaluation=RobustnessEvalSpec,
        result=RobustnessRunResult,
        steal=steal_robustness,
        command=robustness_command,
    )
)


def family_of(attack: str) -> AttackFamily[Any, Any]:
    """The family of the registered attack ``attack`` (a ``ValueError`` for an unknown attack, or an
    attack whose family is not registered)."""
    return FAMILIES.get(ATTACKS.get(attack).family)


@functools.cache
def _adapter(results: tuple[type[RunResult], ...]) -> TypeAdapter[Any]:
    if len(results) == 1:
        return TypeAdapter(results[0])
    # A union built at run time from the registered families: no static type to give mypy.
    return TypeAdapter(Annotated[Union[results], Field(discriminator="family")])  # type: ignore[arg-type]  # noqa: UP007


def result_adapter() -> TypeAdapter[Any]:
    """Validates any registered family's result: the union of every family's result model,
    discriminated by ``family`` (built from the registry, so a family registered later is in it)."""
    return _adapter(tuple(family.result for _, family in FAMILIES.items()))

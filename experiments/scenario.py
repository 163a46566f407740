"""Scenario files: the matrix of victims x defenses x attacks x budgets x seeds the range runs.

A scenario is YAML validated by pydantic; every name is checked when the file is read (attacks and
their parameters, defense pipelines for the victim's kind, datasets, each attack family's
evaluation), so a typo fails in a second with the field's path, not an hour into the run.
:meth:`Scenario.cells` expands the matrix: each victim meets the attacks whose family steals its
kind (:mod:`attacker_client.families`).

    name: quick
    victims: [{model: fmnist-encoder, kind: encoder, profile: quick}]
    defenses:
      - {name: none}
      - {name: noise, pipeline: [{name: embedding_noise, sigma: 0.1}]}
    attacks:
      - {attack: rda, params: {max_steps: 60}}
    budgets: [1000, 4000]
    evaluation:                     # per attack family, each checked by the family's spec
      encoder: {downstream: [fashion_mnist], probe_epochs: 20}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

import defenses.output  # noqa: F401  (registers the output defenses)
from attacker_client.attacks import ATTACKS, Attack
from attacker_client.families import FAMILIES, AttackFamily
from common.datasets import DATASETS
from common.models import ModelKind
from defenses.base import DefensePipeline
from defenses.data.sep import Method as ProtectionMethod
from defenses.detectors import build_detector
from victims.recipes import VictimRecipe, recipe_for, robust_recipe

NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VictimSpec(Strict):
    """A served victim: a model store name, trained from its recipe when missing (``profile``)."""

    model: str = Field(pattern=NAME)
    kind: ModelKind = "encoder"
    profile: Literal["quick", "paper"] | None = Field(
        "quick", description="recipe to train it from when the store lacks it; null: it must exist"
    )
    defense: str | None = Field(
        None, description="training-time defense of a classifier victim (ast, nasty, stingy)"
    )
    defense_params: dict[str, Any] = Field(default_factory=dict)
    robust: bool = Field(False, description="the PGD adversarially trained encoder recipe")
    objective: Literal["supervised", "simclr"] | None = Field(
        None, description="an encoder's recipe: supervised backbone or SimCLR (default: the profile's)"
    )

    def recipe(self) -> VictimRecipe | None:
        """The recipe that makes this victim (None without a profile: it must be in the store)."""
        if self.profile is None:
            return None
        if self.robust:
            return robust_recipe(self.profile)
        return recipe_for(self.kind, self.profile, self.defense, self.objective, **self.defense_params)


class DefenseSpec(Strict):
    """A named defense setting: an output pipeline and, optionally, a detector."""

    name: str = Field(pattern=NAME)
    pipeline: list[dict[str, Any]] = Field(default_factory=list)
    detector: dict[str, Any] | None = None


class AttackSpec(Strict):
    """A registered attack with its parameters (``name`` tells two settings apart).

    The attack's family (encoder, classifier, robustness, ...) says which victims it meets: those
    of the kind it steals.
    """

    attack: str
    name: str | None = Field(None, pattern=NAME)
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.attack.replace("_", "-")

    @property
    def attack_class(self) -> type[Attack]:
        """The registered attack (an unknown name raises ``ValueError``)."""
        return ATTACKS.get(self.attack)

    @property
    def family(self) -> AttackFamily[Any, Any]:
        """The attack's family (``ValueError`` for an unknown attack or family)."""
        return FAMILIES.get(self.attack_class.family)

    @property
    def kind(self) -> ModelKind:
        """The kind of victim this attack steals."""
        return self.family.kind

    def check(self) -> None:
        """Build the attack with its parameters (validation only)."""
        ATTACKS.build(self.attack, self.params)


class DataProtectionSpec(Strict):
    """Self-Ensemble Protection in the range: protect a dataset with each method at each eps, then
    train fresh models on the protected copy, the clean data and random noise of the same eps."""

    dataset: str = "fashion_mnist"
    size: int = Field(5000, ge=10, description="first images of the train split to protect")
    methods: list[ProtectionMethod] = Field(
        default_factory=lambda: list(get_args(ProtectionMethod)), min_length=1
    )
    eps: list[float] = Field(default_factory=lambda: [8.0], min_length=1, description="pixel levels (x/255)")
    steps: int = Field(10, ge=1)
    step_size: float | None = Field(None, gt=0, description="pixel levels; default eps / 4")
    checkpoints: int = Field(5, ge=1)
    epochs: int = Field(4, ge=1, description="epochs of the protecting run and of each evaluation model")


class DefenseCostSpec(Strict):
    """How each defense's cost to honest users is measured (once per victim and defense)."""

    images: int = Field(1000, ge=10)
    probe_train_size: int = Field(2000, ge=10)
    dataset: str | None = Field(None, description="the honest user's task (default: the victim's dataset)")


def served_name(victim: str, defense: str) -> str:
    """A victim's name in the range's store behind ``defense``: ``<victim>--<defense>`` (the
    victim's own name behind ``none``), at most 64 characters."""
    return victim if defense == "none" else f"{victim}--{defense}"[:64]


class Cell(Strict):
    """One run: a victim behind a defense, one attack, one budget, one seed."""

    id: str
    victim: VictimSpec
    defense: DefenseSpec
    attack: AttackSpec
    budget: int
    seed: int

    @property
    def served_name(self) -> str:
        """The model's name in the range's store: the victim, copied once per defense."""
        return served_name(self.victim.model, self.defense.name)


class Scenario(Strict):
    """The whole matrix and everything shared by its cells."""

    name: str = Field(pattern=NAME)
    description: str = ""
    model_store: Path = Path("model_store")
    victims: list[VictimSpec] = Field(default_factory=list)
    defenses: list[DefenseSpec] = Field(default_factory=lambda: [DefenseSpec(name="none")], min_length=1)
    attacks: list[AttackSpec] = Field(default_factory=list)
    budgets: list[int] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    rate: float | None = Field(None, gt=0, description="each cell's key: images/s (null: unlimited)")
    report_rate: float | None = Field(
        None,
        gt=0,
        description="images/s the report converts queries to time at when the range's keys run "
        "unlimited (a provider's planned per-key limit); ignored when rate is set",
    )
    burst: int | None = Field(None, ge=1)
    query_set: str = "fashion_mnist"
    query_split: Literal["train", "test", "attacker"] = "attacker"
    evaluation: dict[str, SerializeAsAny[BaseModel]] = Field(
        default_factory=dict,
        validate_default=True,
        description="per attack family, its evaluation spec (every registered family, defaults filled)",
    )
    data_protection: DataProtectionSpec | None = None
    defense_cost: DefenseCostSpec | None = Field(default_factory=DefenseCostSpec)
    workers: int = Field(1, ge=1, description="uvicorn workers of the victim API")
    device: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        """Scenario files from before the family registry: ``<family>_evaluation`` moved."""
        if isinstance(data, dict):
            for key in data:
                family = str(key).removesuffix("_evaluation")
                if key != family and family in FAMILIES:
                    raise ValueError(
                        f"{key} moved under evaluation: write `evaluation: {{{family}: {{...}}}}` "
                        f"(each attack family's evaluation under its name)"
                    )
        return data

    @field_validator("evaluation", mode="before")
    @classmethod
    def _family_specs(cls, value: Any) -> dict[str, BaseModel]:
        """Each family's evaluation validated by its spec; the families not named get defaults."""
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ValueError(
                "evaluation: a mapping of attack family to its evaluation, e.g. {encoder: {...}}"
            )
        families = dict(FAMILIES.items())
        for key in value:
            if key in families:
                continue
            owners = [name for name, family in families.items() if key in family.evaluation.model_fields]
            if owners:
                raise ValueError(
                    f"{key!r} is a field of the {owners[0]} evaluation, which moved under "
                    f"evaluation.{owners[0]}: write `evaluation: {{{owners[0]}: {{{key}: ...}}}}`"
                )
            raise ValueError(f"unknown attack family {key!r}; known: {', '.join(families)}")
        specs = create_model(  # type: ignore[call-overload]
            "Evaluation",
            __config__=ConfigDict(extra="forbid"),
            **{
                name: (family.evaluation, Field(default_factory=family.evaluation))
                for name, family in families.items()
            },
        )
        return dict(specs.model_validate(value))

    def evaluation_for(self, family: AttackFamily[Any, Any]) -> BaseModel:
        """The scenario's evaluation spec of ``family`` (its defaults when the scenario has none)."""
        spec = self.evaluation.get(family.name)
        return family.evaluation() if spec is None else spec

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        if not (self.victims and self.attacks and self.budgets) and self.data_protection is None:
            raise ValueError("a scenario needs victims, attacks and budgets, or data_protection")
        if self.victims and not self.budgets:
            raise ValueError("budgets: at least one budget is needed to run attacks")
        if any(b < 1 for b in self.budgets):
            raise ValueError("budgets must be >= 1")
        for field, names in (
            ("victims", [v.model for v in self.victims]),
            ("defenses", [d.name for d in self.defenses]),
            ("attacks", [a.label for a in self.attacks]),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"{field}: names must be unique, got {names}")
        known = set(DATASETS.names())
        protected = [self.data_protection.dataset] if self.data_protection else []
        for dataset in [self.query_set, *protected]:
            if dataset not in known:
                raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(known))}")
        for i, attack in enumerate(self.attacks):
            try:
                attack.family  # noqa: B018  (raises for an unknown attack or family)
            except ValueError as exc:
                raise ValueError(f"attacks.{i}.attack: {exc}") from None
            try:
                attack.check()
            except (ValueError, ValidationError) as exc:
                raise ValueError(f"attacks.{i}.params: {exc}") from None
        for i, victim in enumerate(self.victims):
            robust_name = robust_recipe(victim.profile or "quick").name
            if (
                victim.robust
                and victim.profile is not None
                and (victim.kind != "encoder" or robust_name != victim.model)
            ):
                raise ValueError(f"victims.{i}.robust: the robust recipe makes the encoder {robust_name!r}")
            if victim.defense is not None or victim.objective is not None:
                try:
                    recipe = victim.recipe()
                except (ValueError, ValidationError) as exc:
                    where = "defense" if victim.defense is not None else "objective"
                    raise ValueError(f"victims.{i}.{where}: {exc}") from None
                if recipe is not None and recipe.name != victim.model:
                    made_by = victim.defense or victim.objective
                    raise ValueError(f"victims.{i}.model: the {made_by} recipe makes {recipe.name!r}")
        for victim in self.victims:
            if not any(attack.kind == victim.kind for attack in self.attacks):
                raise ValueError(f"victims: {victim.model} is a {victim.kind} and no attack steals one")
            for i, defense in enumerate(self.defenses):
                try:
                    DefensePipeline.from_specs(defense.pipeline, victim.kind)
                    if defense.detector is not None:
                        build_detector(defense.detector).check(victim.kind)
                except (ValueError, ValidationError) as exc:
                    raise ValueError(f"defenses.{i} ({defense.name}): {exc}") from None
        return self

    def cells(self) -> list[Cell]:
        """Every (victim, defense, attack of the victim's kind, budget, seed), in that nesting order."""
        return [
            Cell(
                id=f"{victim.model}__{defense.name}__{attack.label}__{budget}__s{seed}",
                victim=victim,
                defense=defense,
                attack=attack,
                budget=budget,
                seed=seed,
            )
            for victim in self.victims
            for defense in self.defenses
            for attack in self.attacks
            if attack.kind == victim.kind
            for budget in self.budgets
            for seed in self.seeds
        ]


class ScenarioError(ValueError):
    """A scenario file that cannot be run, with the field that is wrong."""


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"no scenario file at {path}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping of fields, got {type(raw).__name__}")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, error['loc'])) or '(scenario)'}: {error['msg']}" for error in exc.errors()
        ]
        raise ScenarioError(f"invalid scenario {path}:\n" + "\n".join(lines)) from None

"""What every stealing run shares, whatever its family (``steal_encoder``, ``steal_classifier``,
``steal_robustness``, or a family registered elsewhere): its inputs (:class:`StealingRunConfig`),
the base of its typed result (:class:`RunResult`, written to ``result.json``), the run folder's
file names, the attacker's query pool, the victim's local white-box checkpoint, the versions
recorded."""

from __future__ import annotations

import abc
import hashlib
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from rich.console import RenderableType

from attacker_client.client import VictimClient
from common.checkpoints import InputSpec, read_card
from common.datasets import ImageData, get_dataset, make_splits

RESULT_FILE = "result.json"
CACHE_FILE = "query_cache.sqlite"
SURROGATE_DIR = "surrogate"
VICTIM_STORE_ENV = "STEALRANGE_VICTIM_STORE"


class StealingRunConfig(BaseModel):
    """What every run's config holds: the victim, the key, the attack and its parameters, the query
    pool, the budget, the run folder, where to find the victim's white-box checkpoint. Each family's
    config adds ``evaluation`` (its evaluation spec) and may change the defaults; the range builds
    this base and hands it to :meth:`attacker_client.families.AttackFamily.run`."""

    model_config = ConfigDict(extra="forbid")

    url: str
    key: SecretStr
    model: str
    attack: str = Field(description="a registered attack of the run's family")
    params: dict[str, Any] = Field(default_factory=dict, description="the attack's parameters")
    query_set: str = "fashion_mnist"
    query_split: str = "attacker"
    budget: int = Field(ge=1)
    out: Path
    device: str = "auto"
    data_root: Path | None = None
    progress: bool | None = None
    cache_namespace: str | None = Field(
        None, description="keys the query cache instead of the URL (the range: stable across ports)"
    )
    victim_checkpoint: Path | None = Field(None, description="the victim's checkpoint (white-box scores)")
    victim_store: Path = Field(
        Path("model_store"),
        description="the attacker's copy of the victim's model store, searched when no checkpoint is given",
    )
    reference_cache: Path | None = Field(
        None,
        description="a folder keeping reference scores that do not change from run to run (the "
        "victim's, an untrained surrogate's, the no-query alternative's), reused by later runs",
    )


class ReferenceCache:
    """Scores of reference models, one JSON file per key (what the scores depend on), so the runs
    of a range measure each reference once. Written atomically; a corrupt file is measured again."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, key: dict[str, Any]) -> Path:
        text = json.dumps(key, sort_keys=True, default=str)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"

    def get(self, key: dict[str, Any]) -> Any | None:
        try:
            entry = json.loads(self._path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return entry.get("value") if entry.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, key: dict[str, Any], value: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}, default=str))
        tmp.replace(path)


def query_pool(name: str, split: str, spec: InputSpec, data_root: Path | None) -> ImageData:
    """The attacker's query images, adapted to the victim's input (channels, size).

    ``split`` is ``train`` or ``test`` of the dataset, or ``attacker``: the attacker's pool of
    :func:`common.datasets.make_splits` (seed 0), the half of the train split the victim's recipe
    did not train on (in-distribution data the victim never saw).
    """
    if split == "attacker":
        data = make_splits(name, root=data_root).attacker_pool
    else:
        data = get_dataset(name, split, root=data_root)
    return data.adapt(spec.channels, (spec.height, spec.width))


def find_victim_checkpoint(given: Path | None, store: Path, model: str, version: str) -> Path | None:
    """The victim's local checkpoint: ``given``, else ``<store>/<model>`` (the run's
    ``victim_store``: ``--victim-store`` / ``$STEALRANGE_VICTIM_STORE``, default ``model_store``)
    when its weights' digest is the served version's."""
    if given is not None:
        return given
    folder = store / model
    try:
        card = read_card(folder)
    except (FileNotFoundError, ValueError):
        return None
    return folder if version and card.sha256.startswith(version) else None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("stealrange")
    except PackageNotFoundError:
        own = "unknown"
    return {"stealrange": own, "torch": torch.__version__, "python": platform.python_version()}


class ClientSettings(Protocol):
    """What a run's config says about reaching the victim."""

    url: str
    key: SecretStr
    progress: bool | None
    cache_namespace: str | None


def open_victim_client(config: ClientSettings, out: Path) -> VictimClient:
    """The run's client: its query cache in ``out``, keyed by ``cache_namespace`` when given."""
    return VictimClient(
        config.url,
        config.key.get_secret_value(),
        cache=out / CACHE_FILE,
        progress=config.progress,
        cache_namespace=config.cache_namespace,
    )


def victim_input(metadata: dict[str, Any], model: str, kind: str, needed_for: str = "") -> InputSpec:
    """The victim's input shape from its metadata, after checking it is a ``kind``."""
    if metadata["kind"] != kind:
        raise ValueError(
            f"{model!r} is a {metadata['kind']}, not an {kind}{needed_for}".replace("an c", "a c")
        )
    _, channels, height, width = metadata["inputs"][0]["shape"]
    return InputSpec(channels=channels, height=height, width=width)


class QueriesRecord(BaseModel):
    """Queries of a run: planned, spent (the server's usage after minus before: the authority),
    sent, cache hits, and the key's usage after the run."""

    planned: int
    spent: int
    sent: int
    cache_hits: int
    key_used: int
    key_remaining: int | None


def queries_record(planned: int, before: dict[str, Any], after: dict[str, Any], sent: int) -> QueriesRecord:
    """The :class:`QueriesRecord` of a run from the key's usage (``GET /v1/usage``) before and after."""
    return QueriesRecord(
        planned=planned,
        spent=after["used"] - before["used"],
        sent=sent,
        cache_hits=planned - sent,
        key_used=after["used"],
        key_remaining=after.get("remaining"),
    )


def version_of(metadata: dict[str, Any]) -> str:
    """The served version (the weights' digest prefix) from the victim's metadata, or ``""``."""
    return (metadata.get("versions") or [""])[0]


class VictimInfo(BaseModel):
    """The victim as the run saw it: its URL, served name and version, input shape, the metrics its
    card reports, and the local checkpoint used for white-box reference scores (if any)."""

    url: str
    model: str
    version: str
    input: list[int]
    reported_metrics: dict[str, Any]
    checkpoint: str | None


def run_fields(
    config: StealingRunConfig,
    attack: Any,
    version: str,
    spec: InputSpec,
    metadata: dict[str, Any],
    victim_path: Path | None,
    pool_size: int,
    victim_info: type[VictimInfo] = VictimInfo,
    **victim_extra: Any,
) -> dict[str, Any]:
    """The fields every family's :class:`RunResult` fills the same way: the attack (name, paper,
    parameters), the victim as the run saw it (``victim_info`` with ``victim_extra``: the family's
    own victim fields), the query pool and the budget."""
    return {
        "attack": attack.name,
        "paper": attack.paper,
        "params": attack.params.model_dump(mode="json"),
        "victim": victim_info(
            url=config.url,
            model=config.model,
            version=version,
            input=list(spec.shape),
            reported_metrics=metadata.get("metrics", {}),
            checkpoint=str(victim_path) if victim_path else None,
            **victim_extra,
        ),
        "query_set": QuerySetInfo(name=config.query_set, split=config.query_split, pool_size=pool_size),
        "budget": config.budget,
    }


class QuerySetInfo(BaseModel):
    """The attacker's query pool: dataset, split and size."""

    name: str
    split: str
    pool_size: int


class RunSeconds(BaseModel):
    """Wall times of a run: querying, training (when the attack trains after querying), evaluating
    (when timed apart), in all."""

    query: float
    train: float | None = None
    evaluate: float | None = None
    total: float


def fmt(value: float | None, digits: int = 3) -> str:
    """A score as the report and the CLI print it (``-`` when unknown)."""
    return "-" if value is None else f"{value:.{digits}f}"


def budget_text(budget: int) -> str:
    """A budget as the report prints it: ``4k`` for 4000, ``750`` for 750."""
    return f"{budget // 1000}k" if budget >= 1000 and budget % 1000 == 0 else str(budget)


class ReportRow(Protocol):
    """A finished range cell as the report hands it to a family's section
    (:class:`experiments.results.CellLine`)."""

    attack: str
    defense: str
    budget: int
    result: Any


class RunResult(BaseModel):
    """The typed result of one run, the base of every family's: what every run records, and what
    the range's report reads from it (each family implements the abstract part).

    ``family`` is the discriminator: each family's result narrows it to a ``Literal`` of its name,
    so a ``results.jsonl`` line reads back as the right model (:mod:`experiments.results`).
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    family: str
    attack: str
    paper: str
    params: dict[str, Any]
    victim: VictimInfo
    query_set: QuerySetInfo
    budget: int
    samples: int
    queries: QueriesRecord
    seconds: RunSeconds
    device: str
    versions: dict[str, str]

    success_label: ClassVar[str]
    """What :attr:`success` measures (a plot's axis label)."""
    quality_label: ClassVar[str]
    """What :attr:`quality` and :attr:`victim_quality` measure (a plot's axis label)."""
    legend: ClassVar[str]
    """What :meth:`cell_text` shows (a sentence of the report's introduction)."""
    invariant_success_label: ClassVar[str] = ""
    """What :attr:`invariant_success` measures; empty: the same as ``success_label``."""

    @property
    @abc.abstractmethod
    def success(self) -> float | None:
        """How well the attack did: the family's headline metric (``success_label``)."""

    @property
    @abc.abstractmethod
    def quality(self) -> float | None:
        """The stolen model's own task score (``quality_label``)."""

    @property
    @abc.abstractmethod
    def victim_quality(self) -> float | None:
        """The victim's score on the same task, when known."""

    @property
    def baseline_quality(self) -> float | None:
        """The attacker's best score on the same task without a single query (the no-query
        alternative), when the family measures one; None by default."""
        return None

    @property
    def gain_recovered(self) -> float | None:
        """Share of the victim's gain over the no-query alternative that the stolen model recovered,
        ``(quality - baseline) / (victim - baseline)``; None where a term is unknown or the victim
        has no gain to steal."""
        quality, victim, baseline = self.quality, self.victim_quality, self.baseline_quality
        if quality is None or victim is None or baseline is None or victim - baseline <= 0:
            return None
        return (quality - baseline) / (victim - baseline)

    @property
    def invariant_success(self) -> float | None:
        """The success metric where a defense may change each key's output space (B4B's per-key
        transforms): transform-invariant; the plain :attr:`success` by default."""
        return self.success

    @abc.abstractmethod
    def cell_text(self, budget: str) -> str:
        """The report's short text of this run in its table cell (``budget`` already formatted)."""

    @abc.abstractmethod
    def summary(self) -> list[RenderableType]:
        """What ``stealrange attack`` prints when the run ends (tables and lines)."""

    @classmethod
    def report_notes(cls, rows: Sequence[ReportRow]) -> list[str]:
        """Markdown lines the report adds under a victim's table, from the finished cells of this
        family (``row.result`` is an instance of this class); none by default."""
        return []

    def queries_line(self) -> str:
        """``queries spent (server): S of budget B (H cache hits)``."""
        q = self.queries
        return f"queries spent (server): {q.spent} of budget {self.budget} ({q.cache_hits} cache hits)"

    def write(self, out: Path) -> Path:
        """Write ``out/result.json`` from the model; returns its path."""
        path = Path(out) / RESULT_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

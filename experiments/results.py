"""The range's results: one typed line per cell in ``results.jsonl``, written by the runner and read
back by the report.

A line (:class:`CellLine`) holds what every cell records (its id and place in the matrix, its
status, the key's usage, flags and audit series, its wall time) and, for a finished cell, the
attack family's typed result (``result``: a :class:`~attacker_client.runs.RunResult` validated as
the union of every registered family's result, discriminated by ``family``; see
:func:`attacker_client.families.result_adapter`). A family registered in one module (a test's toy
family) is read back without a change here.

Files written before results were typed have lines without ``family``: :func:`read_results` refuses
them with a :class:`ResultsFormatError` that says to rerun the scenario with ``--fresh``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attacker_client.families import result_adapter
from experiments.scenario import served_name

RESULTS_FILE = "results.jsonl"


class ResultsFormatError(ValueError):
    """A ``results.jsonl`` line that does not read as a :class:`CellLine`."""


class KeyUsage(BaseModel):
    """The cell's API key after the cell: its id, images charged, budget (admin API)."""

    id: str
    used: int | None
    budget: int | None


class AuditSummary(BaseModel):
    """Charges and refunds of the cell's key (its audit stream): events, images, seconds from the
    first to the last, and the cumulative ``[seconds, images]`` series (at most ~100 points)."""

    events: int
    images: int
    seconds: float
    series: list[tuple[float, int]]


class DetectorFlag(BaseModel):
    """A detector's flag on the key for one served model (its statistics beside it)."""

    model_config = ConfigDict(extra="allow")

    flag: str | None = None


class CellLine(BaseModel):
    """One cell's line of ``results.jsonl``: the cell's common fields and, when it finished, its
    family's result (``status`` ``ok``); a failed cell has its error instead."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    cell: str
    status: Literal["ok", "failed"]
    scenario: str
    victim: str
    defense: str
    pipeline: list[dict[str, Any]] = Field(default_factory=list)
    detector: dict[str, Any] | None = None
    attack: str = Field(description="the attack's label in the scenario")
    family: str = Field(description="the attack's family: the discriminator of ``result``")
    budget: int
    seed: int
    result: Any = Field(None, description="the family's RunResult (status ok)")
    error: str | None = None
    error_code: str | None = None
    key: KeyUsage | None = None
    flags: dict[str, DetectorFlag] = Field(default_factory=dict)
    audit: AuditSummary | None = None
    wall_seconds: float = 0.0

    @field_validator("result", mode="before")
    @classmethod
    def _family_result(cls, value: Any) -> Any:
        return None if value is None else result_adapter().validate_python(value)

    @model_validator(mode="after")
    def _consistent(self) -> CellLine:
        if (self.status == "ok") != (self.result is not None):
            raise ValueError("a finished cell has a result, a failed one has none")
        if self.result is not None and self.result.family != self.family:
            raise ValueError(f"the result is of the {self.result.family} family, the cell of {self.family}")
        return self

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def served_name(self) -> str:
        """The model the cell's attack queried: the victim behind the cell's defense."""
        return served_name(self.victim, self.defense)


def read_results(run_dir: Path) -> list[CellLine]:
    """Every line of ``run_dir/results.jsonl``; a later line for the same cell replaces an earlier
    one. A line that does not read as a :class:`CellLine` is a :class:`ResultsFormatError`."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    lines: dict[str, CellLine] = {}
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        raw = json.loads(text)
        where = f"{path}, line {number} (cell {raw.get('cell', '?')})"
        if "family" not in raw:
            raise ResultsFormatError(
                f"{where} was written before results were typed (it names no attack family): rerun "
                f"the scenario with `stealrange run SCENARIO --fresh`, or move {path.name} away"
            )
        try:
            line = CellLine.model_validate(raw)
        except ValidationError as exc:
            raise ResultsFormatError(
                f"{where} is not a results line of this version ({exc.error_count()} errors, first: "
                f"{'.'.join(map(str, exc.errors()[0]['loc']))}: {exc.errors()[0]['msg']}); rerun the "
                "scenario with `stealrange run SCENARIO --fresh`"
            ) from None
        lines[line.cell] = line
    return list(lines.values())


def append_result(run_dir: Path, line: CellLine) -> None:
    """Append ``line`` to ``run_dir/results.jsonl``."""
    with (Path(run_dir) / RESULTS_FILE).open("a") as f:
        f.write(line.model_dump_json() + "\n")

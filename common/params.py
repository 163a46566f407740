"""``name=value`` command-line parameters (``-p epochs=20``), shared by the CLIs of every side."""

from __future__ import annotations

import json
from typing import Any

import typer


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=20", "train_view=none"]`` -> ``{"epochs": 20, "train_view": "none"}``."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"expected name=value, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[name.strip().replace("-", "_")] = value
    return params

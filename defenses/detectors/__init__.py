"""Stateful detectors of extraction query streams (state in Redis, shared by every worker)."""

from defenses.detectors.prada import PRADA, Detection, PRADAParams

DETECTORS = {PRADA.name: PRADA}


def build_detector(spec: dict) -> PRADA:
    """A detector from ``{"name": "prada", **params}``."""
    name = str(spec.get("name", ""))
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known detectors: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name]({k: v for k, v in spec.items() if k != "name"})


__all__ = ["DETECTORS", "PRADA", "Detection", "PRADAParams", "build_detector"]

"""Stateful detectors of extraction query streams (state in Redis, shared by every worker): the
contract and registry in ``base.py`` (:class:`Detector`, :data:`DETECTORS`), one detector per file,
registered by name on import:

- ``prada``: PRADA (Juuti et al., EuroS&P 2019)
"""

from defenses.detectors import prada
from defenses.detectors.base import (
    DETECTORS,
    Detection,
    Detector,
    DetectorParams,
    build_detector,
)
from defenses.detectors.prada import PRADA, PRADAParams

__all__ = [
    "DETECTORS",
    "PRADA",
    "Detection",
    "Detector",
    "DetectorParams",
    "PRADAParams",
    "build_detector",
    "prada",
]

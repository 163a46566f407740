"""The papers' claims checked by one command (``stealrange claims``, issue 18).

- :mod:`~experiments.claims.base`: the :class:`Claim` contract, :class:`Measurement`, the verdict
  rule (:func:`verdict_of`) and the registry :data:`CLAIMS`;
- one module per paper: :mod:`~experiments.claims.uq_ensembles` (Pape et al., ESANN 2023),
  :mod:`~experiments.claims.sep` (Chen et al., ICLR 2023: ``sep_eps8``, ``sep_eps16``,
  ``sep_eps32``), :mod:`~experiments.claims.ast` (Yilmaz & Keles, arXiv 2403.05181: ``ast_kd``,
  ``ast_kd_paper``, ``ast_kd_released``),
  :mod:`~experiments.claims.rda` (Wu et al., ECCV 2024: ``rda_vs_stolen_encoder``,
  ``rda_vs_cont_steal`` and both ``..._equal_samples``),
  :mod:`~experiments.claims.rrm` (Vaishnavi et al., USENIX Security 2022: ``rrm``);
- :mod:`~experiments.claims.runner`: seeds, the per-seed cache, ``docs/claims.md`` and
  ``docs/claims.json``; :mod:`~experiments.claims.cli`: the command.
"""

from experiments.claims import ast, rda, rrm, sep, uq_ensembles
from experiments.claims.base import (
    CLAIMS,
    Claim,
    ClaimParams,
    ClaimRow,
    Measurement,
    Size,
    Verdict,
    verdict_of,
)

__all__ = [
    "CLAIMS",
    "Claim",
    "ClaimParams",
    "ClaimRow",
    "Measurement",
    "Size",
    "Verdict",
    "ast",
    "rda",
    "rrm",
    "sep",
    "uq_ensembles",
    "verdict_of",
]

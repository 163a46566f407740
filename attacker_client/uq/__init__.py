"""Uncertainty-quantification methods for ensemble stealing (Pape et al., ESANN 2023), one per file,
registered by name in ``UQ_METHODS`` (``UQ_METHODS.build("swag", {...})``):

- ``deep_ensemble``: independent members (Lakshminarayanan et al., NeurIPS 2017)
- ``mc_dropout``: dropout masks at prediction (Gal & Ghahramani, ICML 2016)
- ``swag``: SWA-Gaussian from the SGD trajectory (Maddox et al., NeurIPS 2019)
- ``bbb``: Bayes-by-backprop, mean-field variational weights (Blundell et al., ICML 2015)
- ``laplace``: last-layer Laplace (Daxberger et al., NeurIPS 2021)
"""

from attacker_client.uq import bbb, deep_ensemble, laplace, mc_dropout, swag
from attacker_client.uq.base import UQ_METHODS, Monitor, UQMethod, UQParams, diversity, member_probabilities

__all__ = [
    "UQ_METHODS",
    "Monitor",
    "UQMethod",
    "UQParams",
    "bbb",
    "deep_ensemble",
    "diversity",
    "laplace",
    "mc_dropout",
    "member_probabilities",
    "swag",
]

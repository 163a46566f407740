"""Every attack, one per file, registered by name in :data:`ATTACKS` (``build_attack("rda", {...})``),
each an :class:`Attack` of one family (:mod:`attacker_client.families`).

Encoder family (:class:`EncoderAttack`, :mod:`attacker_client.attacks.base`):

- ``rda``: RDA, Wu et al., ECCV 2024 (prototypes queried once, Discriminate + Align)
- ``stolen_encoder``: StolenEncoder, Liu et al., CCS 2022 (MSE on clean + augmented views)
- ``cont_steal``: Cont-Steal, Sha et al., CVPR 2023 (contrastive, fresh victim views every step)
- ``cont_steal_once``: Cont-Steal with the victim queried once per view, before training
- ``conventional``: end-to-end stealing that queries the victim every epoch

Classifier family (:class:`ClassifierAttack`, :mod:`attacker_client.attacks.classifier`):

- ``knockoff``: Knockoff Nets, Orekondy et al., CVPR 2019 (KD on soft, top-k or hard labels)
- ``ensemble``: ensemble stealing with a UQ method, Pape et al., ESANN 2023

Robustness family:

- ``rrm``: Robust Representation Matching, Vaishnavi et al., USENIX Security 2022
"""

from attacker_client.attacks import (
    cont_steal,
    cont_steal_once,
    conventional,
    ensemble,
    knockoff,
    rda,
    rrm,
    stolen_encoder,
)
from attacker_client.attacks.base import EmbedOracle, EncoderAttack, EncoderAttackParams, StealingResult
from attacker_client.attacks.classifier import ClassifierAttack, ClassifierAttackParams
from attacker_client.attacks.contract import ATTACKS, Attack, AttackParams, build_attack
from attacker_client.attacks.rrm import RobustRepresentationMatching

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackParams",
    "ClassifierAttack",
    "ClassifierAttackParams",
    "EmbedOracle",
    "EncoderAttack",
    "EncoderAttackParams",
    "RobustRepresentationMatching",
    "StealingResult",
    "build_attack",
    "cont_steal",
    "cont_steal_once",
    "conventional",
    "ensemble",
    "knockoff",
    "rda",
    "rrm",
    "stolen_encoder",
]

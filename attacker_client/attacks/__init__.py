"""Encoder-stealing attacks, one per file, registered by name (``build_attack("rda", {...})``).

- ``rda``: RDA, Wu et al., ECCV 2024 (prototypes queried once, Discriminate + Align)
- ``stolen_encoder``: StolenEncoder, Liu et al., CCS 2022 (MSE on clean + augmented views)
- ``cont_steal``: Cont-Steal, Sha et al., CVPR 2023 (contrastive)
- ``conventional``: end-to-end stealing that queries the victim every epoch

Classifier-stealing attacks (:mod:`attacker_client.attacks.classifier`, their own registry):

- ``knockoff``: Knockoff Nets, Orekondy et al., CVPR 2019 (KD on soft, top-k or hard labels)
- ``ensemble``: ensemble stealing with a UQ method, Pape et al., ESANN 2023
"""

from attacker_client.attacks import cont_steal, conventional, ensemble, knockoff, rda, stolen_encoder
from attacker_client.attacks.base import (
    EmbedOracle,
    EncoderAttack,
    EncoderAttackParams,
    StealingResult,
    attack_class,
    build_attack,
    list_attacks,
    register_attack,
)

__all__ = [
    "EmbedOracle",
    "EncoderAttack",
    "EncoderAttackParams",
    "StealingResult",
    "attack_class",
    "build_attack",
    "cont_steal",
    "conventional",
    "ensemble",
    "knockoff",
    "list_attacks",
    "rda",
    "register_attack",
    "stolen_encoder",
]

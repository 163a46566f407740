"""Data-release defenses: Self-Ensemble Protection (Chen et al., ICLR 2023) and its workflow."""

from defenses.data.protection import (
    ProtectionRecipe,
    evaluate_protection,
    load_protected,
    protect_dataset,
    protecting_checkpoints,
)
from defenses.data.sep import SEPConfig, protect, random_noise, target_classes

__all__ = [
    "ProtectionRecipe",
    "SEPConfig",
    "evaluate_protection",
    "load_protected",
    "protect",
    "protect_dataset",
    "protecting_checkpoints",
    "random_noise",
    "target_classes",
]

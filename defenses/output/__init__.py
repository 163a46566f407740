"""Stateless output defenses, one per file, registered by name on import."""

from defenses.output import (
    embedding_noise,
    embedding_rounding,
    embedding_top_k,
    high_confidence,
    label_only,
    probability_noise,
    reverse_sigmoid,
    rounding,
    top_k,
)

__all__ = [
    "embedding_noise",
    "embedding_rounding",
    "embedding_top_k",
    "high_confidence",
    "label_only",
    "probability_noise",
    "reverse_sigmoid",
    "rounding",
    "top_k",
]

"""Output defenses, one per file, registered by name on import (B4B is the stateful one)."""

from defenses.output import (
    adaptive_misinformation,
    b4b,
    embedding_noise,
    embedding_rounding,
    embedding_top_k,
    high_confidence,
    label_only,
    mad,
    probability_noise,
    reverse_sigmoid,
    rounding,
    top_k,
)

__all__ = [
    "adaptive_misinformation",
    "b4b",
    "embedding_noise",
    "embedding_rounding",
    "embedding_top_k",
    "high_confidence",
    "label_only",
    "mad",
    "probability_noise",
    "reverse_sigmoid",
    "rounding",
    "top_k",
]

"""Training-time defenses of a victim classifier, one per file, registered by name:

- ``ast``: Adversarial Sparse Teacher (Yilmaz & Keles, arXiv 2403.05181)
- ``nasty``: Nasty Teacher (Ma et al., ICLR 2021)
- ``stingy``: Stingy Teacher, sparse top-k outputs (Ma et al., 2022)
"""

from defenses.training import ast, nasty, stingy
from defenses.training.base import (
    TeacherDefense,
    TeacherDefenseParams,
    build_teacher_defense,
    list_teacher_defenses,
    register_teacher_defense,
)

__all__ = [
    "TeacherDefense",
    "TeacherDefenseParams",
    "ast",
    "build_teacher_defense",
    "list_teacher_defenses",
    "nasty",
    "register_teacher_defense",
    "stingy",
]

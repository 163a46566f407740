"""Training-time defenses of a victim classifier, one per file, registered by name in ``TEACHER_DEFENSES``:

- ``ast``: Adversarial Sparse Teacher (Yilmaz & Keles, arXiv 2403.05181)
- ``nasty``: Nasty Teacher (Ma et al., ICLR 2021)
- ``stingy``: Stingy Teacher, sparse top-k outputs (Ma et al., 2022)
"""

from defenses.training import ast, nasty, stingy
from defenses.training.base import TEACHER_DEFENSES, TeacherDefense, TeacherDefenseParams

__all__ = [
    "TEACHER_DEFENSES",
    "TeacherDefense",
    "TeacherDefenseParams",
    "ast",
    "nasty",
    "stingy",
]

"""Victim recipes: how the range's victims are trained (quick and paper profiles, training-time
defenses, the robust encoder) and ``stealrange train-victim``. Imported by the range and the
product CLI; it imports only ``common`` and ``defenses``."""

from victims.recipes import (
    VictimRecipe,
    quick_recipes,
    recipe_for,
    robust_recipe,
    simclr_recipe,
    train_victim,
)

__all__ = ["VictimRecipe", "quick_recipes", "recipe_for", "robust_recipe", "simclr_recipe", "train_victim"]

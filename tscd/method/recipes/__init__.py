"""Recipes: training methods the trainer runs (``recipe: <name>`` in the config; docs/method.md 9).

* :mod:`tscd.method.recipes.base`: the interface (:class:`Recipe`, :class:`Batch`, :class:`RecipeContext`) and the
  registry (:func:`register_recipe`, :func:`get_recipe`, :func:`find_recipe`, :func:`recipe_names`).
* :mod:`tscd.method.recipes.tscd`: ``tscd``, the default (TSCD, AAAI 2023).
* :mod:`tscd.method.recipes.afa`: ``afa`` (AFA, CVPR 2022), TSCD's base.
* :mod:`tscd.method.recipes.toco`: ``toco`` (ToCo, CVPR 2023), on a ViT.
"""
from tscd.method.recipes.afa import AFAConfig, AFARecipe
from tscd.method.recipes.base import (
    RECIPES,
    Batch,
    Recipe,
    RecipeContext,
    find_recipe,
    get_recipe,
    recipe_names,
    register_recipe,
)
from tscd.method.recipes.toco import ToCoConfig, ToCoRecipe
from tscd.method.recipes.tscd import TSCDRecipe

__all__ = ["AFAConfig", "AFARecipe", "Batch", "RECIPES", "Recipe", "RecipeContext", "TSCDRecipe", "ToCoConfig",
           "ToCoRecipe", "find_recipe", "get_recipe", "recipe_names", "register_recipe"]

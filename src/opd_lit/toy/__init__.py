"""The embedded toy strong-to-weak pair: a task, a tokenizer and two tiny Qwen3 models.

Runs on a laptop CPU with no download. The trained models ship in ``toy/assets`` (keyed
by the recipe hash); ``toy_model_dir(role)`` returns a verified local HF model directory,
building it into the cache if the shipped one is stale.

Importing this package is light: torch/transformers load only when building.
"""

from .cache import ToyAssetError, toy_model_dir, verify_assets
from .recipe import (
    ROLES,
    Recipe,
    default_recipe,
    recipe_hash,
    toy_eval_problems,
    toy_train_problems,
)
from .task import format_prompt, make_problems

__all__ = [
    "ROLES",
    "Recipe",
    "ToyAssetError",
    "default_recipe",
    "format_prompt",
    "make_problems",
    "recipe_hash",
    "toy_eval_problems",
    "toy_model_dir",
    "toy_train_problems",
    "verify_assets",
]

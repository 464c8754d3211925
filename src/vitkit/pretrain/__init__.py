"""Self-supervised pretraining: MAE (an objective in the one loop) and its recipes."""

from vitkit.pretrain.mae import (
    MAEConfig,
    MAEObjective,
    MaskedAutoencoder,
    evaluate_reconstruction,
    masked_patch_loss,
    patchify,
    random_masking,
    unpatchify,
)
from vitkit.pretrain.presets import RECIPES, Recipe, get_recipe

__all__ = [
    "RECIPES",
    "MAEConfig",
    "MAEObjective",
    "MaskedAutoencoder",
    "Recipe",
    "evaluate_reconstruction",
    "get_recipe",
    "masked_patch_loss",
    "patchify",
    "random_masking",
    "unpatchify",
]

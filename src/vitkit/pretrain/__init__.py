"""Self-supervised pretraining: MAE and Hi-End-MAE (objectives in the one loop) and their recipes."""

from vitkit.pretrain.hiend import HiEndMAE, HiEndMAEConfig
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

# ``vitkit pretrain --method NAME``: the settings class of each autoencoder (it builds the model)
METHOD_CONFIGS: dict[str, type[MAEConfig]] = {"mae": MAEConfig, "hi-end-mae": HiEndMAEConfig}

__all__ = [
    "METHOD_CONFIGS",
    "RECIPES",
    "HiEndMAE",
    "HiEndMAEConfig",
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

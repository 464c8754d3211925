"""Named pretraining / fine-tuning recipes: MAE (He et al., 2022) and the medical MAE recipe
("Delving into Masked Autoencoders for Multi-Label Thorax Disease Classification", Xiao et al.,
WACV 2023).

A recipe is data: MAE settings plus ``TrainConfig`` fields. User flags override every field.

Medical MAE (lambert-x/medical_mae ``PRETRAIN.md`` / ``FINETUNE.md``): pretraining masks 90% of the
patches, crops ``RandomResizedCrop(scale=(0.5, 1.0))`` + horizontal flip, uses a 2-block decoder and
no ``norm_pix_loss`` (its default, not set in the published commands); fine-tuning uses layer decay
0.55, drop-path 0.2, RandAugment ``rand-m6-mstd0.5-inc1``, no mixup / cutmix / random erasing,
weight decay 0.05, min lr 1e-5, BCE for multi-label data (vitkit picks BCE for multi-hot targets)
and reports mean AUROC. Grayscale inputs are replicated to the model's channels by the batch
transform (the recipe replicates grey X-rays to 3 channels). Not reproduced: the per-dataset
normalisation statistics (vitkit normalises with the model's ``pretrained_cfg``), the 800-epoch
schedule and the batch size of 2048 (lr scaling ``blr · batch / 256`` is left to the user).

MAE's own recipe: mask 0.75, ``norm_pix_loss``, ``RandomResizedCrop(scale=(0.2, 1.0))`` + hflip;
fine-tuning with layer decay (0.65 for ViT-B's 12 blocks; 0.75 here for 4-6-block models),
drop-path 0.1. AdamW's betas (0.9, 0.95) are not a vitkit option (timm's default 0.9/0.999 is used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitkit.errors import VitkitError


@dataclass(frozen=True)
class Recipe:
    name: str
    mae: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for pretraining
    finetune: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for fine-tuning


RECIPES: dict[str, Recipe] = {
    "mae": Recipe(
        name="mae",
        mae={"mask_ratio": 0.75, "norm_pix_loss": True, "decoder_depth": 2},
        pretrain={"scale_min": 0.2, "hflip": 0.5, "weight_decay": 0.05, "mixup": 0.0, "cutmix": 0.0},
        finetune={"layer_decay": 0.75, "drop_path": 0.1, "weight_decay": 0.05},
    ),
    "medical-mae": Recipe(
        name="medical-mae",
        mae={"mask_ratio": 0.9, "norm_pix_loss": False, "decoder_depth": 2},
        pretrain={"scale_min": 0.5, "hflip": 0.5, "weight_decay": 0.05, "mixup": 0.0, "cutmix": 0.0},
        finetune={
            "layer_decay": 0.55,
            "drop_path": 0.2,
            "randaug": "rand-m6-mstd0.5-inc1",
            "mixup": 0.0,
            "cutmix": 0.0,
            "reprob": 0.0,
            "weight_decay": 0.05,
            "min_lr": 1e-5,
        },
    ),
    # Hi-End-MAE (FengheTan9/Hi-End-MAE ``main.py``): mask 0.75, the LayerNorm patch target, weight
    # decay 0.05, 2 self-attention decoder blocks; its 3-D crops become MAE's 2-D crop and flip
    "hi-end-mae": Recipe(
        name="hi-end-mae",
        mae={"mask_ratio": 0.75, "norm_pix_loss": True, "decoder_depth": 2},
        pretrain={"scale_min": 0.2, "hflip": 0.5, "weight_decay": 0.05, "mixup": 0.0, "cutmix": 0.0},
        finetune={"layer_decay": 0.75, "drop_path": 0.1, "weight_decay": 0.05},
    ),
    "none": Recipe(name="none"),
}


def get_recipe(name: str | None) -> Recipe:
    key = name or "none"
    if key not in RECIPES:
        raise VitkitError(f"unknown recipe '{name}' (known: {', '.join(sorted(RECIPES))})")
    return RECIPES[key]


def with_recipe(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe's fields with the user's non-None values on top."""
    return {**recipe, **{k: v for k, v in overrides.items() if v is not None}}

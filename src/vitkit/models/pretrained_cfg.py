"""The ``pretrained_cfg`` of vitkit's small-input model presets (timm's registry records it per name).

Imports nothing of vitkit, so every module that registers models (presets, dhvt, hyena) can use it.
"""

from __future__ import annotations

from typing import Any

GRAY_MEAN = (0.5, 0.5, 0.5)
GRAY_STD = (0.5, 0.5, 0.5)


def small_input_cfg(img: int, **overrides: Any) -> dict[str, Any]:
    """10 classes, ``img`` x ``img`` RGB input, mean = std = 0.5, no pretrained weights (``url`` empty)."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, img, img),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": GRAY_MEAN,
        "std": GRAY_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **overrides,
    }

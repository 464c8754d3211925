"""``vitkit demo``: train a small ViT from scratch on the embedded digits and evaluate it.

The recipe (measured on 2 CPU cores, 3 seeds: 96.9–97.8% on 359 held-out images in about 50 s):
vitkit_micro_p4_16 (0.2M parameters, 16x16 input, patch 4), AdamW lr 2e-3, 60 epochs with
3 warm-up epochs, random-resized crops (area 0.7–1) with ±10% shifts, label smoothing 0.1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from vitkit.train import TrainConfig

DEMO_RECIPE: dict[str, Any] = dict(
    model="vitkit_micro_p4_16",
    data="digits",
    epochs=60,
    batch_size=64,
    lr=2e-3,
    warmup_epochs=3,
    scale_min=0.7,
    translate=0.1,
    label_smoothing=0.1,
    tensorboard=False,
)


def demo_config(**overrides: Any) -> TrainConfig:
    return TrainConfig(**{**DEMO_RECIPE, **overrides})


def run_demo(
    output: str | os.PathLike = "runs/demo", *, force: bool = False, quiet: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Train and evaluate the demo model; returns a summary (accuracy, time, run directory)."""
    from vitkit.api import train_model

    t0 = time.perf_counter()
    run = train_model(demo_config(**overrides), output, force=force, quiet=quiet)
    m = run.metrics
    return {
        "run": str(Path(output)),
        "model": DEMO_RECIPE["model"] if "model" not in overrides else overrides["model"],
        "parameters": m["parameters"],
        "val_images": m["n"],
        "top1": m["top1"],
        "balanced_accuracy": m["balanced_accuracy"],
        "macro_f1": m["macro_f1"],
        "ece": m["ece"],
        "train_seconds": m["train_seconds"],
        "total_seconds": time.perf_counter() - t0,
    }

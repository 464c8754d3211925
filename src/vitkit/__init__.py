"""vitkit: train, adapt, compress, audit and deploy Vision Transformers, over timm.

The top-level names are loaded lazily so ``import vitkit`` stays cheap:

    import vitkit
    run = vitkit.train_model(vitkit.TrainConfig(data="digits", epochs=30), "runs/a")
    model = vitkit.load("runs/a")
    metrics, out = vitkit.evaluate_run("runs/a")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "vitkit.models",
    "attention_maps": "vitkit.models",
    "record_transform": "vitkit.models",
    "load_splits": "vitkit.data",
    "load_eval_data": "vitkit.data",
    "TrainConfig": "vitkit.train",
    "fit": "vitkit.train",
    "evaluate": "vitkit.train",
    "Objective": "vitkit.train",
    "train_model": "vitkit.api",
    "evaluate_run": "vitkit.api",
    "load": "vitkit.runs",
    "save_model": "vitkit.runs",
    "VitkitError": "vitkit.errors",
    "quantize": "vitkit.compress.quant",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vitkit' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

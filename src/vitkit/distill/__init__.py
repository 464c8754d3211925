"""Distillation: DeiT token distillation, DeiT-LT, feature distillation (G2SD generic stage, ScaleKD).
A flat teacher for DeiT-LT trains with SAM (:class:`vitkit.train.SAM`, a loop callback).

The public names load lazily (``from vitkit.distill import DeiTConfig``) so importing the package is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "apply_dist_token": "vitkit.distill.deit",
    "DistTokenConfig": "vitkit.distill.deit",
    "DeiTConfig": "vitkit.distill.deit",
    "DeiTObjective": "vitkit.distill.deit",
    "evaluate_heads": "vitkit.distill.deit",
    "hard_distillation_loss": "vitkit.distill.deit",
    "soft_distillation_loss": "vitkit.distill.deit",
    "DeiTLTConfig": "vitkit.distill.deitlt",
    "DeiTLTObjective": "vitkit.distill.deitlt",
    "G2SDConfig": "vitkit.distill.feature",
    "G2SDObjective": "vitkit.distill.feature",
    "ScaleKDConfig": "vitkit.distill.feature",
    "ScaleKDObjective": "vitkit.distill.feature",
    "Teacher": "vitkit.distill.teacher",
    "load_teacher": "vitkit.distill.teacher",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vitkit.distill' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__

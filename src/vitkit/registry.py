"""Transforms that ``vitkit.load`` can replay, by the name they record in the manifest.

A transform registers ``name -> "module:function"``; the function has the signature
``fn(model, config: dict) -> model`` and rebuilds the *structure* the transform produced (swapped
modules, added tokens, buffers of the right shape) and records itself again. It must not depend on
data: calibrated values, learned prompts and the like come back from ``model.safetensors``.
Entries are import paths so that loading a plain run never imports heavy optional packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from vitkit.errors import VitkitError

ReplayFn = Callable[[nn.Module, dict], nn.Module]

_TRANSFORMS: dict[str, str | ReplayFn] = {
    # name: "vitkit.package.module:function"   (technique issues add their entries here)
    "lora": "vitkit.adapt.lora:replay_lora",
    "lora-qv": "vitkit.adapt.lora:replay_lora_qv",
    "vpt": "vitkit.adapt.vpt:replay_vpt",
    "dvpt": "vitkit.adapt.dvpt:replay_dvpt",
    "explora": "vitkit.adapt.explora:replay_explora",
    # compress: faster ViTs (issue 6)
    "tome": "vitkit.compress.tokens.tome:replay_tome",
    "evit": "vitkit.compress.tokens.evit:replay_evit",
    "exits": "vitkit.compress.exits:replay_exits",
    "repavit": "vitkit.compress.reparam:replay_repavit",
    "repavit_reparam": "vitkit.compress.reparam:replay_repavit_reparam",
    "prune_structured": "vitkit.compress.prune.structured:replay_structured_prune",
    "lpvit": "vitkit.compress.prune.lpvit:replay_lpvit",
    "dimap": "vitkit.compress.prune.dimap:replay_dimap",
    "linear_attention": "vitkit.compress.linear_attention:replay_linear_attention",
}


def register_transform(name: str, target: str | ReplayFn) -> None:
    """Register a replay function (or its import path) under the name the transform records."""
    _TRANSFORMS[name] = target


def get_transform(name: str) -> ReplayFn:
    target = _TRANSFORMS.get(name)
    if target is None:
        raise VitkitError(
            f"the run's manifest names transform '{name}', which this vitkit does not know "
            f"(known: {', '.join(sorted(_TRANSFORMS)) or 'none'}); was it made by a newer vitkit?"
        )
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def known_transforms() -> list[str]:
    return sorted(_TRANSFORMS)

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from vitkit.errors import VitkitError

if TYPE_CHECKING:
    from vitkit.train.objectives import Objective

ReplayFn = Callable[[nn.Module, dict], nn.Module]

_TRANSFORMS: dict[str, str | ReplayFn] = {
    # name: "vitkit.package.module:function"   (technique issues add their entries here)
    "gmm": "vitkit.smalldata.gmm:replay_gmm",
    "ewa": "vitkit.smalldata.ewa:replay_ewa",
    "ewa_merge": "vitkit.smalldata.ewa:replay_ewa_merge",
    "stem": "vitkit.smalldata.stem:replay_stem",
    "attention_temperature": "vitkit.analyze.patches:replay_attention_temperature",
    "dist_token": "vitkit.distill.deit:replay_dist_token",
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
    "quantize": "vitkit.compress.quant.transform:replay_quantization",
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


# -- transforms a training run applies by name (``vitkit train --transform NAME:key=value,...``) ------
@dataclass
class TrainTransform:
    """What one ``--transform`` spec does to a training run (``vitkit.api.train_model`` runs it).

    ``apply`` edits the freshly built model before training (and records itself in the manifest);
    ``wrap_objective`` wraps the objective (per-update work such as weight averaging);
    ``finalize`` runs on the trained model before it is evaluated and saved (e.g. merging).
    """

    apply: Callable[[nn.Module], nn.Module]
    wrap_objective: Callable[[Objective], Objective] | None = None
    finalize: Callable[[nn.Module], nn.Module] | None = None


TrainTransformFactory = Callable[[dict[str, str]], TrainTransform]

_TRAIN_TRANSFORMS: dict[str, str | TrainTransformFactory] = {
    # name: "vitkit.package.module:factory"  with factory(options: dict[str, str]) -> TrainTransform
    "gmm": "vitkit.smalldata.gmm:train_transform",
    "ewa": "vitkit.smalldata.ewa:train_transform",
    "stem": "vitkit.smalldata.stem:train_transform",
}


def register_train_transform(name: str, target: str | TrainTransformFactory) -> None:
    """Register a factory (or its import path) that ``--transform name:...`` resolves to."""
    _TRAIN_TRANSFORMS[name] = target


def known_train_transforms() -> list[str]:
    return sorted(_TRAIN_TRANSFORMS)


def parse_transform_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"gmm:k=5,form=additive"`` -> ``("gmm", {"k": "5", "form": "additive"})``; values stay strings
    (the technique's own config validates and converts them)."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise VitkitError(f"transform '{spec}': expected NAME or NAME:key=value,... (e.g. gmm:k=5)")
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise VitkitError(f"transform '{spec}': option '{item}' is not key=value")
        options[key.strip()] = value.strip()
    return name, options


def get_train_transform(spec: str) -> TrainTransform:
    """Resolve a ``--transform`` spec to its :class:`TrainTransform` (options validated here)."""
    name, options = parse_transform_spec(spec)
    target = _TRAIN_TRANSFORMS.get(name)
    if target is None:
        raise VitkitError(
            f"transform '{name}' is not one vitkit train can apply "
            f"(known: {', '.join(known_train_transforms()) or 'none'})"
        )
    factory: Any = target
    if not callable(target):
        module, _, attr = target.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(options)

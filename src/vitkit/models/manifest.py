"""The manifest: what a model is made of, so a run directory can rebuild it.

A manifest holds the base model (timm name + construction kwargs) and the ordered list of
transforms applied to it. It lives on the model as ``model.vitkit_manifest`` and is written to
``model.json``. Transforms record themselves with :func:`record_transform`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

MANIFEST_ATTR = "vitkit_manifest"
FORMAT_VERSION = 1


@dataclass
class TransformRecord:
    name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    transforms: list[TransformRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "base": {"name": self.name, "kwargs": copy.deepcopy(self.kwargs)},
            "transforms": [{"name": t.name, "config": copy.deepcopy(t.config)} for t in self.transforms],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        base = d["base"]
        return cls(
            name=base["name"],
            kwargs=dict(base.get("kwargs", {})),
            transforms=[
                TransformRecord(t["name"], dict(t.get("config", {}))) for t in d.get("transforms", [])
            ],
        )


def get_manifest(model: nn.Module) -> Manifest | None:
    """The model's manifest, looking through wrappers such as DDP (``.module``)."""
    while True:
        m = getattr(model, MANIFEST_ATTR, None)
        if m is not None:
            return m
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def set_manifest(model: nn.Module, manifest: Manifest) -> None:
    # object.__setattr__ keeps nn.Module from treating it as a submodule/parameter.
    object.__setattr__(model, MANIFEST_ATTR, manifest)


def model_name(model: nn.Module) -> str:
    """The name a model was built from (its manifest's timm name), else its class name: for messages."""
    manifest = get_manifest(model)
    return manifest.name if manifest is not None else type(model).__name__


def record_transform(model: nn.Module, name: str, config: dict[str, Any] | None = None) -> None:
    """Append a transform to the model's manifest (call it at the end of ``apply_x``)."""
    manifest = get_manifest(model)
    if manifest is None:
        raise ValueError(
            "the model has no vitkit manifest: build it with vitkit.create_model or vitkit.load so the "
            "transform can be replayed when the run is loaded"
        )
    manifest.transforms.append(TransformRecord(name, copy.deepcopy(config or {})))

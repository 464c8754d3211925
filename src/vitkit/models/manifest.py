"""The manifest: what a model is made of, so a run directory can rebuild it.

A manifest holds the base model (timm name + construction kwargs), the task head a dense model wraps
it in (``head``: a :class:`vitkit.models.dense.DenseHeadConfig`, absent for image-level models) and
the ordered list of transforms applied after that. It lives on the model as ``model.vitkit_manifest`` and is written to
``model.json``. Transforms record themselves with :func:`record_transform`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

MANIFEST_ATTR = "vitkit_manifest"
FORMAT_VERSION = 1

# The timm constructor arguments a run's ``model.json`` may carry (``base.kwargs``). They reach
# ``timm.create_model`` unchanged, and timm also takes arguments that open local files or download
# (``checkpoint_path``, ``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay={"file": ...}``,
# ``cache_dir``, ...), so a tampered run could make vitkit read any file. The list is what vitkit
# writes itself (num_classes, img_size, in_chans from create_model; global_pool, fc_norm from the MAE
# encoder; drop_path_rate from ``drop_path``) plus the plain architecture options of timm's ViTs and
# vitkit's presets that ``model_kwargs`` is documented for. Values must be JSON scalars or lists.
ALLOWED_KWARGS = frozenset(
    {
        # written by vitkit (create_model, api.build_model_for, pretrain.new_encoder, stages.finetune)
        "num_classes", "img_size", "in_chans", "drop_path_rate", "global_pool", "fc_norm",
        # architecture of timm VisionTransformer / vitkit_* presets (model_kwargs, rank-configs)
        "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "proj_bias",
        "init_values", "class_token", "reg_tokens", "no_embed_class", "pos_embed", "pre_norm", "final_norm",
        "dynamic_img_size", "dynamic_img_pad", "weight_init",
        "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
        # vitkit_dhvt_* (models/dhvt.py)
        "sope", "daff", "head_tokens",
        # vitkit_hyena_* (models/hyena.py)
        "order", "filter_width", "filter", "direction",
        # vitkit_tic_* (models/tic.py) and vitkit_dualtoken_* (models/dualtoken.py)
        "window", "dilation", "tail", "grid_dilation", "global_grid",
        # CNN teachers / students (timm ResNet family)
        "drop_block_rate", "output_stride",
        # only the keys in ALLOWED_CFG_OVERLAY (input size and normalization), never a file or URL
        "pretrained_cfg_overlay",
    }
)  # fmt: skip
# ``pretrained_cfg_overlay`` keys that only describe the input (bench/analysis.py sets input_size).
ALLOWED_CFG_OVERLAY = frozenset(
    {"input_size", "test_input_size", "min_input_size", "fixed_input_size", "mean", "std", "crop_pct",
     "crop_mode", "interpolation", "pool_size"}
)  # fmt: skip


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in value
    )


def kwargs_problem(kwargs: Any, field: str = "base.kwargs") -> str | None:
    """What is wrong with ``kwargs`` as model-construction arguments (None: only
    :data:`ALLOWED_KWARGS` with plain values)."""
    if not isinstance(kwargs, dict):
        return f"{field} must be an object of timm arguments, got {type(kwargs).__name__}"
    for key, value in kwargs.items():
        if key not in ALLOWED_KWARGS:
            allowed = ", ".join(sorted(ALLOWED_KWARGS))
            return f"{field} '{key}' is not an allowed model argument (allowed: {allowed})"
        if key == "pretrained_cfg_overlay":
            if not isinstance(value, dict):
                return f"{field} 'pretrained_cfg_overlay' must be an object, got {type(value).__name__}"
            bad = [str(k) for k, v in value.items() if k not in ALLOWED_CFG_OVERLAY or not _plain(v)]
            if bad:
                return (
                    f"{field} 'pretrained_cfg_overlay' may only set {', '.join(sorted(ALLOWED_CFG_OVERLAY))} "
                    f"with plain values (got {', '.join(bad)})"
                )
        elif not _plain(value):
            return f"{field} '{key}' must be a number, string, boolean or list, got {type(value).__name__}"
    return None


def check_kwargs(kwargs: Any, where: str, field: str = "base.kwargs") -> None:
    """Raise :class:`VitkitError` naming ``where`` (e.g. a run's model.json) and ``field`` unless
    ``kwargs`` passes :func:`kwargs_problem`."""
    from vitkit.errors import VitkitError

    problem = kwargs_problem(kwargs, field)
    if problem is not None:
        raise VitkitError(f"{where}: {problem}")


@dataclass
class TransformRecord:
    name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    transforms: list[TransformRecord] = field(default_factory=list)
    head: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "base": {"name": self.name, "kwargs": copy.deepcopy(self.kwargs)},
        }
        if self.head is not None:
            out["head"] = copy.deepcopy(self.head)
        out["transforms"] = [{"name": t.name, "config": copy.deepcopy(t.config)} for t in self.transforms]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        base = d["base"]
        return cls(
            name=base["name"],
            kwargs=dict(base.get("kwargs", {})),
            transforms=[
                TransformRecord(t["name"], dict(t.get("config", {}))) for t in d.get("transforms", [])
            ],
            head=dict(d["head"]) if d.get("head") is not None else None,
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

"""The pieces of fine-tuning a pretrained encoder that are techniques, not a stage: a PEFT method
applied by name (LoRA, LoRA-QV, VPT shallow/deep, DVPT, a head-only linear probe), a
class-stratified fraction of the training labels, and loading a source run's weights into a new model
(position embeddings resampled with timm's ``resample_abs_pos_embed`` when ``img_size`` differs; a
fresh head with MAE's ``trunc_normal(std=2e-5)``). The stage that fine-tunes a run into a new run is
:mod:`vitkit.stages.finetune`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitkit.adapt.common import freeze, keep_backbone_in_eval, set_head_trainable
from vitkit.adapt.dvpt import apply_dvpt
from vitkit.adapt.lora import apply_lora, apply_lora_qv
from vitkit.adapt.vpt import apply_vpt
from vitkit.data import DataSplits, limit_size
from vitkit.errors import VitkitError

PEFT_METHODS = ("lora", "lora-qv", "vpt-shallow", "vpt-deep", "dvpt", "linear")


def apply_peft(model: nn.Module, method: str, config: dict[str, Any] | None = None) -> nn.Module:
    """One of :data:`PEFT_METHODS` on ``model`` (``linear``: only the head trains)."""
    config = dict(config or {})
    if method == "lora":
        return apply_lora(model, config)
    if method == "lora-qv":
        return apply_lora_qv(model, config)
    if method in ("vpt-shallow", "vpt-deep"):
        return apply_vpt(model, {**config, "deep": method == "vpt-deep"})
    if method == "dvpt":
        return apply_dvpt(model, config)
    if method == "linear":
        if config:
            raise VitkitError(f"peft 'linear' takes no options, got {sorted(config)}")
        freeze(model)
        set_head_trainable(model, True)
        keep_backbone_in_eval(model)
        return model
    raise VitkitError(f"unknown --peft '{method}' (expected one of: {', '.join(PEFT_METHODS)})")


def check_labels_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise VitkitError(f"--labels-fraction must be in (0, 1], got {fraction}")
    return float(fraction)


def subsample_labels(data: DataSplits, fraction: float, seed: int) -> DataSplits:
    """Keep a class-stratified ``fraction`` of the training split (at least one image per class)."""
    if fraction >= 1.0:
        return data
    n = max(data.train.num_classes, round(fraction * len(data.train)))
    train = limit_size(data.train, n, seed)
    desc = {**data.description, "labels_fraction": fraction, "train_size": len(train)}
    return DataSplits(train, data.val, data.test, desc)


def load_pretrained_weights(model: nn.Module, source: nn.Module) -> list[str]:
    """Copy ``source``'s weights into ``model`` (same architecture) except the head; resample the
    position embedding when the grids differ. Returns notes on what was adapted."""
    notes = []
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "head_dist."))}
    own = model.state_dict()
    src_pe, own_pe = state.get("pos_embed"), own.get("pos_embed")
    if src_pe is not None and own_pe is not None and src_pe.shape != own_pe.shape:
        old, new = tuple(source.patch_embed.grid_size), tuple(model.patch_embed.grid_size)
        prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        state["pos_embed"] = resample_abs_pos_embed(
            src_pe, new_size=list(new), old_size=list(old), num_prefix_tokens=prefix
        )
        notes.append(
            f"position embedding resampled from a {old[0]}x{old[1]} to a {new[0]}x{new[1]} patch grid "
            "(timm resample_abs_pos_embed, bicubic)"
        )
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise VitkitError(
            f"the source run's weights do not fit the new model: {bad[0]} is {tuple(state[bad[0]].shape)}, "
            f"expected {tuple(own[bad[0]].shape)} (patch size or width changed?)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "head_dist."))]
    if missing or unexpected:
        raise VitkitError(
            f"the source run's weights do not fit the new model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name in ("head", "head_dist"):
            head = getattr(model, name, None)
            if isinstance(head, nn.Linear):
                nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE's fine-tuning head init
                nn.init.zeros_(head.bias)
    notes.append("new classifier head (trunc_normal std 2e-5, as MAE)")
    return notes

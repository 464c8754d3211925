"""Fine-tune a pretrained run (MAE, ExPLoRA, a supervised run) on labelled data, fully or with a
parameter-efficient method, into a new classifier run.

The new model is the source's timm architecture (its kwargs: e.g. ``global_pool='avg'`` +
``fc_norm`` for MAE encoders) with a fresh head (MAE's ``trunc_normal(std=2e-5)``), loaded with the
source's weights. A different ``img_size`` is allowed: the position embedding is resampled with timm's
``resample_abs_pos_embed`` (bicubic, prefix tokens kept) and the run says so. Full fine-tuning uses
the ``mae`` recipe by default (layer-wise LR decay through timm's optimizer factory, drop-path);
``peft`` applies one of LoRA, LoRA-QV, VPT shallow/deep, DVPT or a head-only linear probe, recorded in
the manifest so ``vitkit.load`` rebuilds it. ``labels_fraction`` keeps a class-stratified fraction of
the training labels (validation is untouched).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitkit.adapt.common import freeze, keep_backbone_in_eval, parameter_count, set_head_trainable
from vitkit.adapt.dvpt import apply_dvpt
from vitkit.adapt.lora import apply_lora, apply_lora_qv
from vitkit.adapt.vpt import apply_vpt
from vitkit.data import DataSplits, limit_size
from vitkit.errors import VitkitError
from vitkit.io import write_yaml
from vitkit.models import model_input_size
from vitkit.progress import console
from vitkit.runs import load, read_run, write_metrics

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


def finetune_config(
    source_dir: str | os.PathLike, overrides: dict[str, Any], recipe: str | None, peft: str | None
):
    """The TrainConfig of a fine-tuning run: the source's architecture, the recipe, the user's flags."""
    from vitkit.pretrain.presets import get_recipe, with_recipe
    from vitkit.train import build_config

    info = read_run(source_dir)
    if info.manifest.transforms:
        names = ", ".join(t.name for t in info.manifest.transforms)
        raise VitkitError(
            f"{source_dir}: fine-tuning starts from a plain pretrained run, but it carries transforms ({names}); "
            "merge them first (vitkit.adapt.merge_lora) or fine-tune its source"
        )
    kwargs = {
        k: v
        for k, v in info.manifest.kwargs.items()
        if k not in ("num_classes", "img_size", "in_chans", "drop_path_rate")
    }
    recipe_name = recipe if recipe is not None else ("mae" if peft is None else "none")
    fields = with_recipe(get_recipe(recipe_name).finetune, overrides)
    fields.setdefault("model", info.manifest.name)
    if fields["model"] != info.manifest.name:
        raise VitkitError(
            f"--model {fields['model']}: fine-tuning keeps the source run's architecture ({info.manifest.name})"
        )
    fields["model_kwargs"] = {**kwargs, **fields.get("model_kwargs", {})}
    return build_config(**fields), recipe_name, info


def finetune(
    source: str | os.PathLike,
    output: str | os.PathLike,
    train: dict[str, Any] | None = None,
    *,
    labels_fraction: float = 1.0,
    peft: str | None = None,
    peft_config: dict[str, Any] | None = None,
    recipe: str | None = None,
    data: DataSplits | None = None,
    force: bool = False,
    quiet: bool = False,
):
    """Fine-tune the run ``source`` into ``output``; returns :class:`vitkit.api.TrainedRun`.

    Args:
        train: ``TrainConfig`` fields (data, epochs, lr, img_size, ...) on top of the recipe.
        labels_fraction: fraction of the training labels to use, in (0, 1].
        peft: None (full fine-tuning) or one of :data:`PEFT_METHODS`.
        peft_config: options of the PEFT method (e.g. ``{"rank": 4}`` for LoRA).
        recipe: ``mae`` (default for full fine-tuning), ``medical-mae`` or ``none`` (default for PEFT).
    """
    from vitkit.api import data_splits_for, train_model
    from vitkit.models import create_model

    check_labels_fraction(labels_fraction)
    if peft is not None and peft not in PEFT_METHODS:
        raise VitkitError(f"unknown --peft '{peft}' (expected one of: {', '.join(PEFT_METHODS)})")
    cfg, recipe_name, _ = finetune_config(source, dict(train or {}), recipe, peft)
    src = load(source)
    c, h, _ = model_input_size(src)
    if cfg.in_chans is not None and cfg.in_chans != c:
        raise VitkitError(f"--in-chans {cfg.in_chans}: {source} was pretrained on {c}-channel input")
    cfg = cfg.model_copy(update={"img_size": cfg.img_size or h, "in_chans": c})
    if data is None:
        data = data_splits_for(cfg, cfg.img_size)
    data = subsample_labels(data, labels_fraction, cfg.seed)

    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    model = create_model(
        cfg.model, num_classes=data.train.num_classes, img_size=cfg.img_size, in_chans=c, **kwargs
    )
    notes = load_pretrained_weights(model, src)
    if peft is not None:
        apply_peft(model, peft, peft_config)
    count = parameter_count(model)
    if not quiet:
        for note in notes:
            console.print(f"finetune: {note}")
        console.print(f"finetune ({peft or 'full'}): {count}")
    run = train_model(cfg, output, model=model, data=data, force=force, quiet=quiet)
    finetune_info = {
        "source": str(source),
        "labels_fraction": labels_fraction,
        "recipe": recipe_name,
        "peft": peft,
        "peft_config": peft_config or {},
        "notes": notes,
    }
    write_yaml(Path(output) / "finetune.yaml", finetune_info)
    run.metrics.update({"finetune": finetune_info, "trainable_fraction": count.fraction})
    write_metrics(output, run.metrics)
    return run

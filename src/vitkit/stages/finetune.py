"""Fine-tune a pretrained run (MAE, ExPLoRA, a supervised run) on labelled data, fully or with a
parameter-efficient method, into a new classifier run, or into a run with a task head (``task``
segmentation, change or detection: the pretrained ViT under the task's new head; full fine-tuning
only). A source with a task head passes on its ViT, an image-text (CLIP) run its image tower.

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

from vitkit.adapt.common import parameter_count
from vitkit.adapt.peft import (
    PEFT_METHODS,
    apply_peft,
    check_labels_fraction,
    load_pretrained_weights,
    subsample_labels,
)
from vitkit.data import DataSplits
from vitkit.errors import VitkitError
from vitkit.io import write_yaml
from vitkit.models import create_model, get_manifest, model_input_size
from vitkit.models.dense import DenseModel
from vitkit.models.detection import DetectionModel
from vitkit.models.imagetext import ImageTextModel
from vitkit.pretrain.presets import get_recipe, with_recipe
from vitkit.progress import console
from vitkit.runs import Run, write_metrics
from vitkit.stages.train import data_splits_for, train_model
from vitkit.tasks import resolve_task
from vitkit.train import build_config

_IMAGE_LABEL_AUGMENTATIONS = ("randaug", "mixup", "cutmix", "reprob", "label_smoothing", "mixup_off_epoch")


def _head_task(spec: str | None) -> bool:
    """The task puts the ViT under a head of its own (segmentation, change, detection)."""
    from vitkit.tasks import get_task

    return spec is not None and get_task(spec).head_model


def finetune_config(
    source_dir: str | os.PathLike | Run, overrides: dict[str, Any], recipe: str | None, peft: str | None
):
    """The TrainConfig of a fine-tuning run: the source's architecture, the recipe, the user's flags."""
    info = (source_dir if isinstance(source_dir, Run) else Run.open(source_dir)).info
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
    if _head_task(fields.get("task")):
        # the recipe's image-label augmentations (mixup, RandAugment, ...) mean nothing for masks;
        # what the user asked for stays (and the task refuses it in one line)
        for key in _IMAGE_LABEL_AUGMENTATIONS:
            if key not in overrides:
                fields.pop(key, None)
    fields.setdefault("model", info.manifest.name)
    if fields["model"] != info.manifest.name:
        raise VitkitError(
            f"--model {fields['model']}: fine-tuning keeps the source run's architecture ({info.manifest.name})"
        )
    fields["model_kwargs"] = {**kwargs, **fields.get("model_kwargs", {})}
    return build_config(**fields), recipe_name, info


def _check_vitp_source(source_run: Run, src) -> None:
    if not isinstance(src, DenseModel) or src.config.task != "segmentation" or src.config.head == "vitp":
        raise VitkitError(
            f"{source_run.path}: --head vitp fine-tunes from a one-stage segmentation run (its regions are "
            "ViT-P's proposals); train one with `vitkit train --task segmentation`"
        )


def _vitp_over(source_run: Run, src, vit, options, data: DataSplits, img_size: int):
    """ViT-P (``vitkit.models.vitp``) with the source run's segmenter as its frozen stage 1."""
    from vitkit.models.vitp import attach_vitp_head, vitp_head_config

    where = source_run.path
    _check_vitp_source(source_run, src)
    if list(source_run.classes) != list(data.train.classes):
        raise VitkitError(
            f"{where}: its classes ({', '.join(source_run.classes)}) differ from the data's "
            f"({', '.join(data.train.classes)}); ViT-P reclassifies stage 1's regions over the same classes"
        )
    size = model_input_size(src)[1]
    if img_size != size:
        raise VitkitError(f"--img-size {img_size}: ViT-P runs at its stage 1's input size ({size})")
    return attach_vitp_head(vit, vitp_head_config(src, options.points, options.alpha), stage1=src)


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
    """Fine-tune the run ``source`` into ``output``; returns :class:`vitkit.stages.train.TrainedRun`.

    Args:
        train: ``TrainConfig`` fields (data, epochs, lr, img_size, ...) on top of the recipe.
        labels_fraction: fraction of the training labels to use, in (0, 1].
        peft: None (full fine-tuning) or one of :data:`PEFT_METHODS`.
        peft_config: options of the PEFT method (e.g. ``{"rank": 4}`` for LoRA).
        recipe: ``mae`` (default for full fine-tuning), ``medical-mae`` or ``none`` (default for PEFT).
    """
    check_labels_fraction(labels_fraction)
    if peft is not None and peft not in PEFT_METHODS:
        raise VitkitError(f"unknown --peft '{peft}' (expected one of: {', '.join(PEFT_METHODS)})")
    source_run = Run.open(source)  # model.json read once for the whole stage
    cfg, recipe_name, _ = finetune_config(source_run, dict(train or {}), recipe, peft)
    src = source_run.model()
    if _head_task(cfg.task):
        from vitkit.tasks import get_task

        head_task = get_task(cfg.task)
        head_task.check_config(cfg)  # --head merged into the task's options, refused in one line if wrong
        if getattr(head_task.options, "head", None) == "vitp":
            _check_vitp_source(source_run, src)
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
    # a run with a task head (segmentation, change, detection) passes on its ViT, an image-text run
    # its image tower (whose projection head stays behind like a classifier)
    notes = load_pretrained_weights(
        model, src.backbone if isinstance(src, (DenseModel, DetectionModel, ImageTextModel)) else src
    )
    task = resolve_task(cfg.task, data)
    if task.head_model:  # the pretrained ViT under the task's head (segmentation, change, detection)
        if peft is not None:
            raise VitkitError(
                f"--peft {peft}: parameter-efficient fine-tuning of {task.name} heads is not supported yet"
            )
        task.check_config(cfg)  # --head merged into the task's options
        if getattr(task.options, "head", None) == "vitp":
            model = _vitp_over(source_run, src, model, task.options, data, cfg.img_size)
            notes.append(
                f"ViT-P over {source}'s frozen segmenter (stage 1), the point ViT from its backbone; "
                f"{task.options.points} points per chunk, fusion alpha {task.options.alpha}"
            )
        else:
            model = task.build_head(model, task.num_outputs(data))
            notes.append(f"{task.name} head: {get_manifest(model).head['head']} (new, randomly initialised)")
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
    if getattr(task.options, "head", None) == "vitp":  # what ViT-P buys over its stage 1 alone
        key = task.quality_key
        run.metrics[f"stage1_{key}"] = source_run.metrics.get(key)
    write_metrics(output, run.metrics)
    return run

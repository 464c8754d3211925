"""``vitkit train``: train a model into a run directory (config, data, task, transforms, the loop, evaluation)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.data import DataSplits, seed_everything
from vitkit.errors import VitkitError
from vitkit.io import write_yaml
from vitkit.models import count_parameters
from vitkit.registry import get_train_transform
from vitkit.runs import (
    CONFIG,
    check_run_dir,
    new_run_dir,
    save_model,
)
from vitkit.stages.common import build_model_for, data_splits_for, model_img_size
from vitkit.tasks import get_task
from vitkit.train import Callback, TrainConfig, build_config, fit
from vitkit.train.checkpoint import clean_stale_temps
from vitkit.train.distributed import launched_rank
from vitkit.train.loop import task_for_config
from vitkit.train.objectives import Objective


@dataclass
class TrainedRun:
    path: Path
    model: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def train_model(
    config: TrainConfig | dict[str, Any],
    output: str | os.PathLike,
    *,
    objective: Objective | None = None,
    callbacks: Sequence[Callback] = (),
    model: nn.Module | None = None,
    data: DataSplits | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    stop_after_epoch: int | None = None,
) -> TrainedRun:
    """Train a model into the run directory ``output`` and evaluate it.

    Builds the model and data from ``config`` unless given. ``resume=True`` continues the run in
    ``output`` from its checkpoint (the config should be the one in its ``config.yaml``).
    ``config.transforms`` (``vitkit train --transform``) are applied to the model before training,
    in order (see :class:`vitkit.registry.TrainTransform`); their ``finalize`` steps run on the
    trained model before it is evaluated and saved. ``callbacks`` go to the loop (``fit``), before
    the transforms' own.
    """
    cfg = config if isinstance(config, TrainConfig) else build_config(**config)
    # Resolved first, so a bad transform option fails before anything is written.
    transforms = [get_train_transform(spec) for spec in cfg.transforms]
    out = Path(output)
    is_main = launched_rank() == 0
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise VitkitError(f"cannot resume '{out}': no checkpoint.pt there")
    elif is_main:
        check_run_dir(out, force=force)  # before any work: a wrong -o fails in a second
        # Undone if training fails before its first checkpoint (see new_run_dir): a bad dataset, img_size
        # or a NaN loss in the first epoch leaves nothing behind.
        with new_run_dir(out, force=force):
            return _train_into(
                cfg, transforms, out, objective, callbacks, model, data, resume, quiet, stop_after_epoch,
                is_main,
            )  # fmt: skip
    return _train_into(
        cfg, transforms, out, objective, callbacks, model, data, resume, quiet, stop_after_epoch, is_main
    )


def _train_into(
    cfg: TrainConfig,
    transforms: list,
    out: Path,
    objective: Objective | None,
    callbacks: Sequence[Callback],
    model: nn.Module | None,
    data: DataSplits | None,
    resume: bool,
    quiet: bool,
    stop_after_epoch: int | None,
    is_main: bool,
) -> TrainedRun:
    seed_everything(cfg.seed)
    if data is None:
        get_task(cfg.task).check_uri(cfg.data)  # before loading: multilabel on digits fails at once
        data = data_splits_for(
            cfg,
            model_img_size(cfg)
            if cfg.data.startswith(("folder:", "csv:", "coco:", "imagetext:", "shards:"))
            else cfg.img_size,
        )
    task = task_for_config(cfg, data)  # before the model: the task decides the head's width
    if task.head_model and cfg.img_size is None and model is None:
        # masks and boxes are scored at their own size: a dense model or a detector runs at the data's
        # (square) size unless told otherwise, not at its preset's (the 16 px micro preset would shrink
        # 64 px canvases to 16 px)
        h, w = data.val.images.shape[-2:]  # val: a streamed training split has no images tensor
        if h == w:
            cfg = cfg.model_copy(update={"img_size": int(h)})
    if resume:
        _check_resume_classes(out, data)
    if model is None:
        seed_everything(cfg.seed)
        model = build_model_for(cfg, task.num_outputs(data))
        if task.head_model:  # the backbone's classifier becomes the task's head (dense, detection)
            model = task.build_head(model, task.num_outputs(data))
    callbacks = list(callbacks)
    for t in transforms:
        model = t.apply(model)
        if t.callbacks is not None:
            callbacks += t.callbacks()
    task.check_head(model, data, cfg.model)
    if is_main:
        write_yaml(out / CONFIG, cfg.model_dump(mode="json"))
        write_yaml(out / "classes.yaml", {"classes": data.classes, "task": task.spec})

    result = fit(
        model,
        data,
        cfg,
        objective=objective,
        callbacks=callbacks,
        run_dir=out,
        resume=resume,
        quiet=quiet,
        stop_after_epoch=stop_after_epoch,
        task=task,
    )
    final = result.model
    for t in transforms:
        if t.finalize is not None:
            final = t.finalize(final)
    counts = data.train.class_counts()
    # fp32, the precision the weights are saved in, whatever training ran in: `vitkit evaluate` and
    # every later stage (quantize, export, compare) reproduce these numbers from the saved run.
    metrics = task.evaluate(
        final,
        data.val,
        device=next(final.parameters()).device,
        class_counts=None if data.multilabel else counts,
    )
    metrics.update(
        {
            "split": "val",
            "train_class_counts": counts,
            "parameters": count_parameters(final),
            "trainable_parameters": count_parameters(final, trainable_only=True),
            "epochs": result.epochs_completed,
            "train_seconds": round(result.train_seconds, 3),
            "precision": result.precision,
            "eval_precision": "fp32",
            "world_size": result.dist.world_size,
            "weight_checksums": result.weight_checksums,
            "data_description": data.description,
        }
    )
    if result.dist.is_main:
        save_model(out, final, classes=data.classes, task=task.spec, data=data.description)
        task.write_outputs(metrics, data.val, out)  # metrics.json and the task's plots
        clean_stale_temps(out)  # left by a process killed mid-write in an earlier session
    return TrainedRun(out, final, metrics, result.history)


def _check_resume_classes(out: Path, data: DataSplits) -> None:
    import yaml

    p = out / "classes.yaml"
    if not p.is_file():
        return
    saved = yaml.safe_load(p.read_text()).get("classes", [])
    if len(saved) != data.train.num_classes:
        raise VitkitError(
            f"cannot resume '{out}': it was trained on {len(saved)} classes, the data now has {data.train.num_classes}"
        )


def resume_config(run_dir: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The config saved in a run, with overrides (e.g. more epochs) on top."""
    p = Path(run_dir)
    if not p.is_dir():
        raise VitkitError(f"cannot resume '{p}': the directory does not exist")
    if not (p / CONFIG).is_file():
        raise VitkitError(f"cannot resume '{p}': no {CONFIG} there (not a vitkit training run)")
    return build_config(p / CONFIG, **overrides)

"""The Python API behind the CLI verbs: train a run, evaluate a run. The CLI only parses and prints."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.data import DataSplits, ImageDataset, load_eval_data, seed_everything
from vitkit.errors import VitkitError
from vitkit.io import write_yaml
from vitkit.models import count_parameters, create_model, model_input_size
from vitkit.registry import get_train_transform
from vitkit.runs import (
    CONFIG,
    METRICS,
    RunInfo,
    check_run_dir,
    load,
    new_run_dir,
    read_run,
    save_model,
    splits_from_config,
)
from vitkit.tasks import Task, get_task
from vitkit.train import Callback, TrainConfig, build_config, fit
from vitkit.train.checkpoint import clean_stale_temps
from vitkit.train.loop import task_for_config
from vitkit.train.objectives import Objective


@dataclass
class TrainedRun:
    path: Path
    model: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def data_splits_for(cfg: TrainConfig, img_size: int | None) -> DataSplits:
    return splits_from_config(cfg, img_size)


def build_model_for(cfg: TrainConfig, num_classes: int) -> nn.Module:
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    return create_model(
        cfg.model,
        num_classes=num_classes,
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
        pretrained_file=cfg.pretrained_file,
        **kwargs,
    )


def _model_img_size(cfg: TrainConfig) -> int:
    if cfg.img_size:
        return cfg.img_size
    probe = create_model(cfg.model, num_classes=1, **cfg.model_kwargs)
    return model_input_size(probe)[1]


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
    is_main = int(os.environ.get("RANK", "0")) == 0
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
            cfg, _model_img_size(cfg) if cfg.data.startswith(("folder:", "csv:")) else cfg.img_size
        )
    task = task_for_config(cfg, data)  # before the model: the task decides the head's width
    if resume:
        _check_resume_classes(out, data)
    if model is None:
        seed_everything(cfg.seed)
        model = build_model_for(cfg, task.num_outputs(data))
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


def _slug(uri: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", uri).strip("_")[:60] or "data"


def evaluation_data(
    info: RunInfo, uri: str | None, img_size: int, strict: bool = False, same_classes: bool = True
) -> ImageDataset:
    """The data to evaluate a run on: its own validation split when ``uri`` is its training data (or
    None), otherwise the whole of ``uri`` (its test/val split when it has one). ``same_classes=False``
    accepts other classes than the run's (retrieval is often scored on classes it never saw)."""
    cfg_path = info.path / CONFIG
    if cfg_path.is_file():
        cfg = build_config(cfg_path)
        if uri is None or uri == cfg.data:
            return data_splits_for(
                cfg, img_size if cfg.data.startswith(("folder:", "csv:")) else cfg.img_size
            ).val
    if uri is None:
        raise VitkitError(
            f"run '{info.path}' has no training config: say which data to evaluate on with --data"
        )
    data = load_eval_data(uri, img_size=img_size, strict=strict)
    if not same_classes:
        return data
    if info.classes and data.num_classes != info.num_classes:
        raise VitkitError(
            f"{uri} has {data.num_classes} classes but run '{info.path}' was trained on {info.num_classes}: num_classes mismatch"
        )
    if info.classes and data.classes != info.classes and not all(c.isdigit() for c in data.classes):
        raise VitkitError(
            f"{uri}: class names {data.classes[:4]}... differ from the run's {info.classes[:4]}..."
        )
    return data


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | None = None,
    *,
    output: str | os.PathLike | None = None,
    batch_size: int = 256,
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = False,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """Evaluate a run with its task's metrics; writes ``metrics.json`` and the task's plots
    (``confusion_matrix.png``, ``recall_at_k.png``, ...) into ``output`` (default
    ``RUN/eval-<data>/``). Returns (metrics, output directory)."""
    info = read_run(run_dir)
    if info.task == "none":
        raise VitkitError(
            f"run '{run_dir}' is a self-supervised encoder without a classifier: evaluate it with --probe linear|knn"
        )
    task = run_task(info)  # before loading anything: a run of an unknown task fails at once
    model = load(run_dir, device=device)
    from vitkit.threads import set_threads_for

    set_threads_for(model)  # OMP_NUM_THREADS, else by model size and free cores (printed once)
    info = model.vitkit_run
    img = model_input_size(model)[1]
    dataset = evaluation_data(info, data, img, strict=strict, same_classes=task.name != "retrieval")
    if task.name == "classification" and dataset.multilabel:
        task = get_task("multilabel")  # a legacy run that said "multiclass" for multi-hot data
    train_counts = None
    m = _read_train_metrics(info.path)
    if m:
        train_counts = m.get("train_class_counts")
    metrics = task.evaluate(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        class_counts=train_counts,
        many_threshold=many_threshold,
        few_threshold=few_threshold,
    )
    out = Path(output) if output else info.path / f"eval-{_slug(data or dataset.name)}"
    out.mkdir(parents=True, exist_ok=True)
    task.write_outputs({**metrics, "run": str(info.path)}, dataset, out)
    return metrics, out


def run_task(info: RunInfo) -> Task:
    """The task a run's model.json names (``"multiclass"`` of older runs is classification)."""
    try:
        return get_task(info.task)
    except VitkitError as e:
        raise VitkitError(f"{info.path / 'model.json'}: {e}") from e


def _read_train_metrics(path: Path) -> dict[str, Any]:
    from vitkit.io import read_json

    p = path / METRICS
    return read_json(p) if p.is_file() else {}


def read_run_info(run_dir: str | os.PathLike) -> RunInfo:
    return read_run(run_dir)

"""What several stages need from a run or a config: its data, its model, the data to evaluate it on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.data import DataSplits, ImageDataset, load_eval_data
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.models import create_model, model_input_size
from vitkit.runs import CONFIG, METRICS, RunInfo, splits_from_config
from vitkit.tasks import Task, get_task
from vitkit.train import TrainConfig, build_config


def data_splits_for(cfg: TrainConfig, img_size: int | None) -> DataSplits:
    return splits_from_config(cfg, img_size)


def build_model_for(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model ``cfg`` describes with a ``num_classes`` head (drop-path and kwargs from the config)."""
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


def model_img_size(cfg: TrainConfig) -> int:
    """The input size of ``cfg``'s model: the config's, else the architecture's default."""
    if cfg.img_size:
        return cfg.img_size
    probe = create_model(cfg.model, num_classes=1, **cfg.model_kwargs)
    return model_input_size(probe)[1]


def slug(uri: str) -> str:
    """A directory-name-safe form of a data URI (``eval-<slug>/``)."""
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


def run_task(info: RunInfo) -> Task:
    """The task a run's model.json names (``"multiclass"`` of older runs is classification)."""
    try:
        return get_task(info.task)
    except VitkitError as e:
        raise VitkitError(f"{info.path / 'model.json'}: {e}") from e


def read_train_metrics(path: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` (what training measured), or {} when it has none."""
    p = path / METRICS
    return read_json(p) if p.is_file() else {}

"""What several stages need from a run or a config: its data, its model, the data to evaluate it on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.data import DataSplits, ImageDataset
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.models import create_model, model_input_size
from vitkit.runs import METRICS, Run, RunInfo, splits_from_config
from vitkit.tasks import Task, get_task
from vitkit.train import TrainConfig


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
    """:meth:`vitkit.runs.Run.eval_data` of the run ``info`` describes (for stages that hold a model
    loaded by ``vitkit.load``, whose ``vitkit_run`` is that description)."""
    return Run(info).eval_data(uri, img_size, strict=strict, same_classes=same_classes)


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

"""The training configuration: one validated, flat pydantic model (YAML file and CLI flags map onto it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitkit.errors import VitkitError
from vitkit.registry import format_validation_error


class TrainConfig(BaseModel):
    """Everything a training run needs. Unknown or mistyped fields are errors, named in one line."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model: str = Field("vitkit_micro_p4_16", description="timm or vitkit model name")
    img_size: int | None = Field(None, gt=0, description="input side in pixels (default: the model's)")
    in_chans: int | None = Field(None, gt=0, description="input channels (default: the model's, usually 3)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm constructor arguments")
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic depth rate")
    pretrained_file: str | None = Field(None, description="local weights to start from (.safetensors/.pth)")
    transforms: list[str] = Field(
        default_factory=list,
        description="model transforms applied before training, in order: 'name' or 'name:key=value,...'",
    )

    # task
    task: str = Field(
        "classification",
        description="what to learn: classification, multilabel, retrieval, segmentation, change; options as "
        "NAME:key=value,... (e.g. retrieval:bits=32); multi-label data makes classification multilabel",
    )
    head: Literal["linear", "upernet", "changevit", "vitp"] | None = Field(
        None,
        description="dense tasks (segmentation, change): the decoder head, linear (per patch), upernet "
        "(default), changevit (change only) or vitp (vitkit finetune SEG_RUN: ViT-P over that run's "
        "regions); more as --task segmentation:pyramid=multilevel,channels=128",
    )
    detector: Literal["fcos", "deformable-detr", "co-detr"] | None = Field(
        None,
        description="task detection: fcos (default), deformable-detr (or detr) or co-detr (Deformable DETR "
        "trained with Co-DETR's auxiliary heads); more as --task detection:queries=100,co_heads=atss",
    )

    # data
    data: str = Field(
        "digits",
        description="dataset URI: digits, fashion-mnist, folder:P, csv:P, npz:P, mosaic:URI; dense: canvas, "
        "canvas-change, segfolder:P, pairs:P",
    )
    val_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of the training data held out for validation (data without a val split)",
    )
    split_seed: int = Field(0, description="seed of the train/validation split")
    longtail: float | None = Field(None, ge=1, description="long-tail imbalance factor ρ = n_max / n_min")
    train_size: int | None = Field(
        None, gt=0, description="use only this many training images (a seeded subset)"
    )
    val_size: int | None = Field(
        None, gt=0, description="use only this many validation images (a seeded subset)"
    )
    train_samples: int | None = Field(
        None,
        gt=0,
        description="samples per epoch, whatever the data's size: the training split is shuffled and cycled "
        "(or cut) to this many (DataComp's fixed recipe: epochs x train_samples samples seen for every subset)",
    )
    strict_data: bool = Field(False, description="fail on the first unreadable image instead of skipping it")

    # augmentation
    scale_min: float = Field(1.0, gt=0, le=1, description="random-resized-crop minimum area fraction")
    translate: float = Field(0.0, ge=0, lt=1, description="random shift, as a fraction of the side")
    hflip: float = Field(0.0, ge=0, le=1, description="horizontal flip probability")
    randaug: str | None = Field(None, description="timm RandAugment string, e.g. rand-m9-mstd0.5")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0: off)")
    reprob: float = Field(0.0, ge=0, le=1, description="random erasing probability")
    mixup_off_epoch: int | None = Field(
        None, ge=0, description="turn mixup/cutmix off from this epoch (0-based; timm's --mixup-off-epoch)"
    )
    sampler: Literal["random", "balanced", "sqrt"] = Field(
        "random",
        description="how each epoch draws training samples: random (shuffle), balanced (each class "
        "equally often) or sqrt (class frequency ∝ √n_c), the last two with replacement",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy target")

    # optimisation
    epochs: int = Field(30, gt=0, description="passes over the training data")
    batch_size: int = Field(64, gt=0, description="per process")
    accum_steps: int = Field(1, gt=0, description="gradient accumulation steps per optimizer step")
    optimizer: str = Field("adamw", description="any timm optimizer name: adamw, sgd, lion, ...")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default per optimizer)")
    weight_decay: float | None = Field(
        None,
        ge=0,
        description="decoupled weight decay (default per optimizer: adamw 0.05, lion 0.5, sgd 5e-5)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise LR decay")
    sched: str = Field("cosine", description="timm scheduler name: cosine, step, plateau, ...")
    warmup_epochs: float = Field(0.0, ge=0, description="linear learning-rate warm-up, in epochs")
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the schedule")
    clip_grad: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep a timm EMA of the weights; evaluate it"
    )

    # execution
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto | fp32 | bf16 (auto: bf16 only where the hardware makes it fast)"
    )
    compile: bool = Field(False, description="torch.compile the model")
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    threads: int | None = Field(
        None, gt=0, description="torch CPU threads (default: chosen from the free cores)"
    )
    seed: int = Field(0, description="seed of initialisation, augmentation and sampling")
    loss: Literal["auto", "ce", "bce"] = Field(
        "auto", description="auto | ce | bce (auto: bce for multi-label data, else ce)"
    )
    eval_every: int = Field(1, gt=0, description="evaluate on the validation split every N epochs")
    tensorboard: bool = Field(True, description="write TensorBoard logs into the run")

    @field_validator("model_kwargs")
    @classmethod
    def _allowed_model_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        from vitkit.models.manifest import kwargs_problem

        # they end up in the run's model.json, which vitkit.load only accepts with these arguments
        # (nothing that makes timm open a file: checkpoint_path, pretrained_cfg, ...)
        problem = kwargs_problem(v, "model_kwargs")
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("detector", mode="before")
    @classmethod
    def _detr_alias(cls, v: Any) -> Any:
        return "deformable-detr" if v == "detr" else v  # the name users (and issue 20) say

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        from timm.optim import list_optimizers

        names = set(list_optimizers())
        if v.lower() not in names:
            raise ValueError(f"unknown optimizer '{v}' (timm knows e.g. adamw, sgd, lion, lamb, adan)")
        return v.lower()

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from vitkit.tasks import get_task

        try:
            return get_task(v).spec  # canonical: a legacy alias or default options spelled out go
        except VitkitError as e:
            raise ValueError(str(e)) from e

    @field_validator("transforms")
    @classmethod
    def _known_transforms(cls, v: list[str]) -> list[str]:
        if not v:
            return v  # no lookup: knowing the names imports every technique module (and torch)
        from vitkit.registry import known_train_transforms, parse_transform_spec

        known = known_train_transforms()
        for spec in v:
            name, _ = parse_transform_spec(spec)
            if name not in known:
                raise ValueError(f"unknown transform '{name}' (known: {', '.join(known) or 'none'})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be shorter than epochs ({self.epochs})"
            )
        return self

    # -- resolved defaults -----------------------------------------------------------------
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        # Lion wants a ~10x smaller lr than AdamW (Chen et al. 2023).
        return {"lion": 1e-4, "sgd": 0.05, "momentum": 0.05}.get(self.optimizer, 1e-3)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return {"lion": 0.5, "sgd": 5e-5, "momentum": 5e-5}.get(self.optimizer, 0.05)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise VitkitError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise VitkitError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise VitkitError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def build_config(file: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Config from an optional YAML file, with non-None ``overrides`` (CLI flags) on top."""
    data = read_config_file(file) if file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        raise VitkitError(format_validation_error(e, str(file) if file else "config")) from e

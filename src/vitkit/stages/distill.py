"""``distill``: train a student from a teacher into a normal run directory (the API behind
``vitkit distill``). It composes a student, a teacher and a distillation objective, and hands them
to :func:`vitkit.stages.train.train_model` (the one loop); then it adds per-head metrics."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.data import BatchTransform, DataSplits, seed_everything
from vitkit.distill.deit import (
    DeiTConfig,
    DeiTObjective,
    DistTokenConfig,
    apply_dist_token,
    evaluate_heads,
    has_dist_token,
    no_dist_token_error,
)
from vitkit.distill.deitlt import STRONG_AUGMENT, DeiTLTConfig, DeiTLTObjective
from vitkit.distill.feature import G2SDConfig, G2SDObjective, ScaleKDConfig, ScaleKDObjective
from vitkit.distill.teacher import Teacher, load_teacher
from vitkit.errors import VitkitError
from vitkit.io import check_output, write_yaml
from vitkit.models import model_input_size
from vitkit.runs import Run, write_metrics
from vitkit.stages.common import build_model_for, data_splits_for, slug
from vitkit.stages.train import TrainedRun, train_model
from vitkit.train import TrainConfig, build_config, evaluate, fit
from vitkit.train.objectives import Objective

METHODS = ("deit", "deit-lt", "g2sd", "scalekd")
_METHOD_CONFIGS = {"deit": DeiTConfig, "deit-lt": DeiTLTConfig, "g2sd": G2SDConfig, "scalekd": ScaleKDConfig}
SHOTS = ("many", "medium", "few")


def method_config(method: str, options: dict[str, Any] | None = None):
    """The method's config dataclass from a dict of options (unknown keys are named in one line)."""
    if method not in METHODS:
        raise VitkitError(f"unknown distillation method '{method}': expected one of {', '.join(METHODS)}")
    cls = _METHOD_CONFIGS[method]
    options = {k: v for k, v in (options or {}).items() if v is not None}
    known = set(cls.__dataclass_fields__)
    bad = sorted(set(options) - known)
    if bad:
        raise VitkitError(f"method '{method}' has no option '{bad[0]}' (it takes {', '.join(sorted(known))})")
    return cls(**options)


def deit_lt_recipe(cfg: TrainConfig, lt: DeiTLTConfig) -> TrainConfig:
    """DeiT-LT's student recipe on top of ``cfg``: DeiT's strong augmentation and mixup off for the
    DRW phase — for every field the user did not set explicitly."""
    updates: dict[str, Any] = {k: v for k, v in STRONG_AUGMENT.items() if k not in cfg.model_fields_set}
    drw = lt.drw_epoch(cfg.epochs)
    if lt.no_mixup_drw and drw is not None and "mixup_off_epoch" not in cfg.model_fields_set:
        updates["mixup_off_epoch"] = drw
    if not updates:
        return cfg
    return build_config(**{**cfg.model_dump(exclude_unset=True), **updates})


def _check_output(out: Path, force: bool) -> None:

    check_output(out, "dir", force=force)


def build_objective(
    method: str, teacher: Teacher, student: nn.Module, mcfg, data: DataSplits, cfg: TrainConfig
) -> Objective:
    counts = data.train.class_counts()
    if method == "deit":
        return DeiTObjective(teacher, student, mcfg, label_smoothing=cfg.label_smoothing, class_counts=counts)
    if method == "deit-lt":
        return DeiTLTObjective(teacher, student, counts, mcfg, label_smoothing=cfg.label_smoothing)
    if method == "g2sd":
        return G2SDObjective(teacher, student, mcfg, label_smoothing=cfg.label_smoothing)
    return ScaleKDObjective(teacher, student, mcfg, label_smoothing=cfg.label_smoothing)


def distill(
    config: TrainConfig | dict[str, Any],
    output: str | os.PathLike,
    *,
    teacher: str | os.PathLike | nn.Module,
    method: str = "deit",
    options: dict[str, Any] | None = None,
    teacher_weights: str | os.PathLike | None = None,
    teacher_size: int | None = None,
    add_dist_token: bool = False,
    dist_token_init: str = "random",
    generic_epochs: int = 0,
    data: DataSplits | None = None,
    force: bool = False,
    quiet: bool = False,
) -> TrainedRun:
    """Distil ``teacher`` into the student ``config.model``; write the run to ``output``.

    Args:
        config: the student's training config (model, data, epochs, augmentation, ...).
        teacher: a run directory, a timm name (with ``teacher_weights``), or a model.
        method: ``deit`` | ``deit-lt`` | ``g2sd`` | ``scalekd``.
        options: the method's options (fields of DeiTConfig / DeiTLTConfig / G2SDConfig / ScaleKDConfig).
        teacher_size: the teacher's input side (DeiT-LT's ``--teacher-size``; default its own).
        add_dist_token: give a plain ViT student a DIST token (:func:`apply_dist_token`) for DeiT/DeiT-LT.
        generic_epochs: G2SD only — epochs of the task-agnostic generic stage (feature loss alone)
            before the specific stage; 0 trains the feature and label losses together.

    ``metrics.json`` gains ``heads`` (CLS / DIST / mean metrics, many/medium/few-shot per head) for
    students with a DIST token, ``teacher`` (its metrics on the same validation data) and
    ``distillation`` (the objective's settings).
    """
    cfg = config if isinstance(config, TrainConfig) else build_config(**config)
    mcfg = method_config(method, options)
    if method == "deit-lt":
        cfg = deit_lt_recipe(cfg, mcfg)
    if method == "g2sd" and generic_epochs < 0:
        raise VitkitError(f"generic_epochs must be ≥ 0, got {generic_epochs}")
    out = Path(output)
    _check_output(out, force)

    seed_everything(cfg.seed)
    if data is None:
        data = data_splits_for(cfg, cfg.img_size)
    if data.multilabel:
        raise VitkitError(f"{cfg.data}: distillation here is for single-label classification")
    seed_everything(cfg.seed)
    student = build_model_for(cfg, data.train.num_classes)
    if method in ("deit", "deit-lt") and not has_dist_token(student):
        if not add_dist_token:
            raise no_dist_token_error(student)
        apply_dist_token(student, DistTokenConfig(init=dist_token_init))
    elif add_dist_token and not has_dist_token(student):
        apply_dist_token(student, DistTokenConfig(init=dist_token_init))
    t = load_teacher(
        teacher,
        num_classes=data.train.num_classes,
        classes=data.classes,
        pretrained_file=teacher_weights,
        input_size=teacher_size,
    )

    generic_history: list[dict] = []
    if method == "g2sd" and generic_epochs > 0:
        generic = G2SDObjective(t, student, G2SDConfig(**{**asdict(mcfg), "ce_weight": 0.0}))
        stage1 = build_config(
            **{
                **cfg.model_dump(exclude_unset=True),
                "epochs": generic_epochs,
                "warmup_epochs": min(cfg.warmup_epochs, generic_epochs / 2),
            }
        )
        generic_history = fit(student, data, stage1, objective=generic, quiet=quiet).history
        # The specific stage: DeiT hard distillation when the student has a DIST token (G2SD's SD),
        # plain supervised training otherwise.
        objective: Objective | None = (
            DeiTObjective(
                t,
                student,
                DeiTConfig("hard"),
                label_smoothing=cfg.label_smoothing,
                class_counts=data.train.class_counts(),
            )
            if has_dist_token(student)
            else None
        )
    else:
        objective = build_objective(method, t, student, mcfg, data, cfg)

    run = train_model(cfg, out, objective=objective, model=student, data=data, force=force, quiet=quiet)
    metrics = dict(run.metrics)
    counts = data.train.class_counts()
    device = next(run.model.parameters()).device
    teacher_metrics = evaluate(
        t.model, data.val, device=device, class_counts=counts, transform=_teacher_eval_transform(t)
    )
    metrics["teacher"] = _summary(teacher_metrics)
    if has_dist_token(run.model):
        heads = evaluate_heads(run.model, data.val, class_counts=counts, device=device, teacher=t)
        metrics["heads"] = {h: _summary(heads[h]) for h in ("cls", "dist", "mean")}
        for h in ("cls", "dist", "mean"):
            metrics[f"{h}_top1"] = heads[h]["top1"]
            metrics[f"{h}_balanced_accuracy"] = heads[h]["balanced_accuracy"]
            for g in SHOTS:
                metrics[f"{h}_{g}_shot_accuracy"] = heads[h].get(f"{g}_shot_accuracy")
    metrics["distillation"] = {
        "method": method,
        **(objective.describe() if objective is not None else {"name": "classification"}),
        "generic_epochs": generic_epochs if method == "g2sd" else None,
        "generic_history": generic_history,
    }
    write_metrics(out, metrics)
    write_yaml(
        out / "distill.yaml",
        {
            "method": method,
            "teacher": str(teacher) if not isinstance(teacher, nn.Module) else type(teacher).__name__,
            "teacher_weights": str(teacher_weights) if teacher_weights else None,
            "teacher_size": teacher_size,
            "add_dist_token": add_dist_token,
            "dist_token_init": dist_token_init,
            "generic_epochs": generic_epochs,
            "options": asdict(mcfg),
        },
    )
    run.metrics = metrics
    return run


def _teacher_eval_transform(t: Teacher):

    return BatchTransform(t.input_size, t.in_chans, t.mean, t.std, train=False)


def _summary(m: dict) -> dict:
    keys = ("top1", "balanced_accuracy", "macro_f1", "ece", "teacher_agreement", "per_class_accuracy")
    out = {k: m[k] for k in keys if k in m}
    for g in SHOTS:
        out[f"{g}_shot_accuracy"] = m.get(f"{g}_shot_accuracy")
    return out


def evaluate_run_heads(
    run_dir: str | os.PathLike,
    data: str | None = None,
    *,
    output: str | os.PathLike | None = None,
    batch_size: int = 256,
    many_threshold: int = 100,
    few_threshold: int = 20,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """CLS / DIST / mean metrics of a distilled run on its validation split (or ``data``); writes
    ``metrics.json`` into ``output`` (default ``RUN/heads-<data>/``)."""

    run = Run.open(run_dir)
    info = run.info
    model = run.model(device)
    if not has_dist_token(model):
        raise no_dist_token_error(model)
    dataset = run.eval_data(data, model_input_size(model)[1])
    counts = run.metrics.get("train_class_counts")
    heads = evaluate_heads(
        model,
        dataset,
        class_counts=counts,
        batch_size=batch_size,
        device=device,
        many_threshold=many_threshold,
        few_threshold=few_threshold,
    )
    metrics: dict[str, Any] = {"heads": {h: _summary(heads[h]) for h in ("cls", "dist", "mean")}}
    for h in ("cls", "dist", "mean"):
        metrics[f"{h}_top1"] = heads[h]["top1"]
    metrics["run"] = str(info.path)
    out = Path(output) if output else info.path / f"heads-{slug(data or dataset.name)}"
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out, metrics)
    return metrics, out

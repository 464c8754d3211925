"""Run-directory stages behind the compression verbs: read a run, transform its model, optionally
fine-tune it through the one loop, and write a new run (nothing is changed in place).

    reduce_tokens_run   vitkit reduce-tokens RUN --method evit|tome ... -o OUT [--finetune N]
    prune_run           vitkit prune RUN --heads 0.25 --mlp 0.3 | --method lpvit|dimap ... -o OUT
    reparam_run         vitkit reparam RUN -o OUT                        (RePaViT inference form)
    train_with_exits    vitkit train ... --exits 4,8   (two-stage training of LGViT exit heads)
    evaluate_exit_run   vitkit evaluate RUN --exit-threshold 0.9
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vitkit import io
from vitkit.compress.exits import (
    ExitConfig,
    ExitDistillObjective,
    ExitEndToEndObjective,
    all_exit_logits,
    apply_exits,
    evaluate_early_exit,
    exit_blocks,
    frozen_backbone,
)
from vitkit.compress.prune import (
    DIMAPConfig,
    LPViTConfig,
    StructuredPruneConfig,
    apply_dimap,
    apply_lpvit,
    apply_structured_prune,
    sparsity_report,
)
from vitkit.compress.reparam import reparameterize
from vitkit.compress.tokens import (
    EViTConfig,
    KeepRateSchedule,
    ToMeConfig,
    apply_evit,
    apply_tome,
    set_keep_rate,
)
from vitkit.compress.tokens.evit import check_keep_rate
from vitkit.data import DataSplits, seed_everything
from vitkit.errors import VitkitError
from vitkit.io import write_yaml
from vitkit.models import count_parameters, get_manifest, model_input_size, num_prefix_tokens
from vitkit.registry import get_train_transform
from vitkit.runs import CONFIG, Run, new_run_dir, save_model, write_metrics
from vitkit.stages.common import build_model_for, data_splits_for, slug
from vitkit.stages.train import train_model
from vitkit.train import TrainConfig, evaluate, fit
from vitkit.train.objectives import Objective

STAGE = "stage.yaml"


@dataclass
class StageResult:
    path: Path
    model: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)


def check_output(path: str | os.PathLike, force: bool) -> None:
    """Refuse a bad output before any work (the directory is only created when writing)."""
    io.check_output(path, "dir", force=force)


def finetune_config(cfg: TrainConfig, epochs: int, lr: float | None) -> TrainConfig:
    """The source run's recipe for a short fine-tune: ``epochs`` epochs, no warm-up, a small lr."""
    if epochs < 1:
        raise VitkitError(f"--finetune: the number of fine-tuning epochs must be >= 1, got {epochs}")
    return cfg.model_copy(
        update={
            "epochs": int(epochs),
            "warmup_epochs": 0.0,
            "lr": lr if lr is not None else cfg.resolved_lr() / 4,
            # the source run's --transform specs are already in the model (and its manifest):
            # train_model must not apply them a second time
            "transforms": [],
        }
    )


def derive_run(
    source: str | os.PathLike,
    output: str | os.PathLike,
    transform: Callable[[nn.Module, DataSplits], dict[str, Any]],
    stage: dict[str, Any],
    *,
    finetune: int = 0,
    lr: float | None = None,
    objective: Callable[[nn.Module, TrainConfig, DataSplits], Objective] | None = None,
    callbacks: Callable[[nn.Module, TrainConfig, DataSplits], list] | None = None,
    after_training: Callable[[nn.Module], None] | None = None,
    force: bool = False,
    quiet: bool = True,
) -> StageResult:
    """Load ``source``, apply ``transform(model, data)`` (returns facts for metrics.json), evaluate it
    off the shelf, fine-tune it ``finetune`` epochs when asked, write the new run to ``output``."""

    check_output(output, force)
    run = Run.open(source)  # model.json, config.yaml, metrics.json and the data: each read once
    info = run.info
    cfg = run.config
    if cfg is None:
        raise VitkitError(f"run '{source}' has no {CONFIG}: cannot tell which data it was trained on")
    if finetune:
        finetune_config(cfg, finetune, lr)  # bad values fail before any work
    model = run.model()  # this stage's own Run: changed in place, nobody else holds it
    data = run.splits()
    facts = transform(model, data)
    # Undone if the command fails before the run has a checkpoint (see new_run_dir).
    with new_run_dir(output, force=force) as out:
        model.eval()
        counts = None if data.multilabel else data.train.class_counts()
        off_shelf = evaluate(model, data.val, class_counts=counts)
        metrics: dict[str, Any]
        if finetune:
            ft_cfg = finetune_config(cfg, finetune, lr)
            obj = objective(model, ft_cfg, data) if objective else None
            cbs = callbacks(model, ft_cfg, data) if callbacks else []
            trained = train_model(
                ft_cfg, out, objective=obj, callbacks=cbs, model=model, data=data, force=True, quiet=quiet
            )
            model = trained.model
            if after_training is not None:
                after_training(model)
                model.eval()
                metrics = evaluate(model, data.val, class_counts=counts)
                save_model(out, model, classes=info.classes, task=info.task, data=info.data)
            else:
                metrics = dict(trained.metrics)
        else:
            metrics = off_shelf
            write_yaml(out / CONFIG, cfg.model_dump(mode="json"))
            save_model(out, model, classes=info.classes, task=info.task, data=info.data)
        src = run.metrics
        metrics.update(
            {
                "split": "val",
                "source_run": str(source),
                "source_top1": src.get("top1"),
                "off_the_shelf_top1": off_shelf.get("top1"),
                "finetune_epochs": int(finetune),
                "parameters": count_parameters(model),
                "transforms": [t.name for t in get_manifest(model).transforms],
                **facts,
            }
        )
        write_yaml(
            out / STAGE, {**stage, "source_run": str(source), "finetune_epochs": int(finetune), "lr": lr}
        )
        write_metrics(out, metrics)
        return StageResult(out, model, metrics)


# -- token reduction ------------------------------------------------------------------------------
def reduce_tokens_run(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str,
    keep: float = 0.7,
    at: list[int] | None = None,
    r: int | list[int] = 8,
    prop_attn: bool = True,
    finetune: int = 0,
    lr: float | None = None,
    keep_warmup: float | None = None,
    patch: int | None = None,
    merge: str = "avg",
    force: bool = False,
    quiet: bool = True,
) -> StageResult:
    """EViT (``keep``, ``at``), ToMe (``r``, ``prop_attn``) or PVC (``patch``, ``at``, ``merge``) on a
    run; see :func:`derive_run`."""

    if method == "evit":
        check_keep_rate(keep)
        ecfg = EViTConfig(keep=keep, at=list(at or []))

        def transform(model: nn.Module, data: DataSplits) -> dict:
            apply_evit(model, ecfg)
            return {"method": "evit", "keep": keep, "at": ecfg.at}

        def callbacks(model: nn.Module, cfg: TrainConfig, data: DataSplits) -> list:
            shrink = keep_warmup if keep_warmup is not None else max(1.0, cfg.epochs / 2)
            return [KeepRateSchedule(model, keep, 0.0, shrink)]  # per step: EViT's schedule

        def finish(model: nn.Module) -> None:

            set_keep_rate(model, keep)

        stage = {"stage": "reduce-tokens", "method": "evit", "keep": keep, "at": ecfg.at or "default"}
        return derive_run(
            source, output, transform, stage, finetune=finetune, lr=lr, callbacks=callbacks,
            after_training=finish, force=force, quiet=quiet,
        )  # fmt: skip
    if method == "tome":
        tcfg = ToMeConfig(r=r, prop_attn=prop_attn)

        def transform(model: nn.Module, data: DataSplits) -> dict:
            apply_tome(model, tcfg)
            return {"method": "tome", "r": tcfg.schedule, "prop_attn": prop_attn}

        stage = {"stage": "reduce-tokens", "method": "tome", "r": r, "prop_attn": prop_attn}
        return derive_run(
            source, output, transform, stage, finetune=finetune, lr=lr, force=force, quiet=quiet
        )
    if method == "pvc":
        from vitkit.compress.tokens.pvc import PVCConfig, apply_pvc, pvc_tokens

        pcfg = PVCConfig(patch=patch, at=list(at or []), mode=merge)

        def transform(model: nn.Module, data: DataSplits) -> dict:
            apply_pvc(model, pcfg)
            return {"method": "pvc", **pcfg.model_dump(), "final_patch_tokens": pvc_tokens(model)}

        stage = {"stage": "reduce-tokens", "method": "pvc", **pcfg.model_dump()}
        return derive_run(
            source, output, transform, stage, finetune=finetune, lr=lr, force=force, quiet=quiet
        )
    raise VitkitError(f"--method: expected evit, tome or pvc, got '{method}'")


# -- pruning --------------------------------------------------------------------------------------
def prune_run(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "structured",
    heads: float = 0.0,
    mlp: float = 0.0,
    importance: str = "magnitude",
    flops: float = 0.5,
    block: int = 16,
    power: bool = True,
    sparsity: float = 0.5,
    finetune: int = 0,
    lr: float | None = None,
    force: bool = False,
    quiet: bool = True,
) -> StageResult:
    """Structured (``heads``, ``mlp``, ``importance``), LPViT (``flops``, ``block``, ``power``) or
    DIMAP (``sparsity``) pruning of a run; see :func:`derive_run`."""

    def structured(model: nn.Module, data: DataSplits) -> dict:
        before = count_parameters(model)
        apply_structured_prune(model, StructuredPruneConfig(heads, mlp, importance), data.train)
        return {
            "method": "structured",
            "heads": heads,
            "mlp": mlp,
            "importance": importance,
            "parameters_before": before,
        }

    def lpvit(model: nn.Module, data: DataSplits) -> dict:
        apply_lpvit(
            model, LPViTConfig(flops=flops, block=block, power=power, importance=importance_lp), data.train
        )
        rep = sparsity_report(model, model_input_size(model))
        return {
            "method": "lpvit",
            "flops_target": flops,
            **{k: v for k, v in rep.items() if k != "layer_sparsity"},
        }

    def dimap(model: nn.Module, data: DataSplits) -> dict:
        apply_dimap(model, DIMAPConfig(sparsity=sparsity))
        rep = sparsity_report(model, model_input_size(model))
        return {"method": "dimap", **{k: v for k, v in rep.items() if k != "layer_sparsity"}}

    importance_lp = "l1" if importance == "magnitude" else importance
    fns = {"structured": structured, "lpvit": lpvit, "dimap": dimap}
    if method not in fns:
        raise VitkitError(f"--method: expected structured, lpvit or dimap, got '{method}'")
    if method == "structured" and not heads and not mlp:
        raise VitkitError("structured pruning: give --heads and/or --mlp (fractions removed per block)")
    stage = {"stage": "prune", "method": method, "heads": heads, "mlp": mlp, "importance": importance,
             "flops": flops, "block": block, "power": power, "sparsity": sparsity}  # fmt: skip
    return derive_run(source, output, fns[method], stage, finetune=finetune, lr=lr, force=force, quiet=quiet)


# -- RePaViT --------------------------------------------------------------------------------------
def reparam_run(source: str | os.PathLike, output: str | os.PathLike, *, force: bool = False) -> StageResult:
    """The RePaViT inference form of a run trained with the channel-idle FFN (exact, no training)."""

    def transform(model: nn.Module, data: DataSplits) -> dict:
        before = count_parameters(model)
        reparameterize(model)
        return {"method": "repavit_reparam", "parameters_before": before}

    return derive_run(source, output, transform, {"stage": "reparam"}, force=force)


# -- training with exits / RePaViT / linear attention ---------------------------------------------
DEFAULT_THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)


def train_with_exits(
    cfg: TrainConfig,
    output: str | os.PathLike,
    *,
    exits: list[int],
    distill_epochs: int | None = None,
    distill_lr: float | None = None,
    force: bool = False,
    quiet: bool = False,
) -> StageResult:
    """``vitkit train --exits``: LGViT exit heads, trained in two stages (end-to-end, then
    self-distillation of the exit heads with the backbone frozen, ``distill_epochs`` epochs, default
    epochs/3). Why not a ``--transform``: the second stage is a training run of its own, with its own
    objective and a frozen backbone, which a transform applied around one loop cannot express.
    ``cfg.transforms`` that only change the model (``repavit``, ``linear_attention``, ...) are
    applied first, as ``vitkit train`` applies them."""
    check_output(output, force)
    if cfg.data.startswith(("folder:", "csv:", "coco:")) and not cfg.img_size:
        raise VitkitError("--exits with folder:/csv: data needs --img-size")
    transforms = [get_train_transform(spec) for spec in cfg.transforms]
    for spec, t in zip(cfg.transforms, transforms, strict=True):
        if t.callbacks is not None or t.finalize is not None:
            raise VitkitError(
                f"--exits with --transform {spec}: that transform acts during or after training, and "
                "--exits trains in two stages of its own; train without one of them"
            )
    seed_everything(cfg.seed)
    data = data_splits_for(cfg, cfg.img_size)
    seed_everything(cfg.seed)
    model = build_model_for(cfg, data.train.num_classes)
    for t in transforms:
        model = t.apply(model)
    cfg = cfg.model_copy(update={"transforms": []})  # applied: train_model must not apply them again
    if data.multilabel:
        raise VitkitError("--exits: early exit by confidence needs single-label data")
    apply_exits(model, ExitConfig(exits=list(exits)))
    n2 = distill_epochs if distill_epochs is not None else max(1, cfg.epochs // 3)
    if n2 < 0:
        raise VitkitError(f"--exit-epochs must be >= 0, got {n2}")
    depth = len(model.blocks)
    stage1 = ExitEndToEndObjective(depth, cfg.label_smoothing)
    run = train_model(cfg, output, objective=stage1, model=model, data=data, force=force, quiet=quiet)
    out, model = run.path, run.model
    metrics = dict(run.metrics)
    if n2:
        cfg2 = cfg.model_copy(
            update={
                "epochs": n2,
                "warmup_epochs": 0.0,
                "lr": distill_lr or cfg.resolved_lr() / 2,
                "ema_decay": None,
            }
        )
        grid = tuple(model.patch_embed.grid_size)

        stage2 = ExitDistillObjective(grid, num_prefix_tokens(model), label_smoothing=cfg.label_smoothing)
        with frozen_backbone(model):
            fit(model, data, cfg2, objective=stage2, run_dir=out / "stage2", quiet=quiet)
    model.eval()
    final, per_exit = all_exit_logits(model, data.val)
    metrics["exit_top1"] = {
        str(k): (lg.argmax(1) == data.val.targets).float().mean().item() for k, lg in per_exit.items()
    }
    metrics["final_top1"] = (final.argmax(1) == data.val.targets).float().mean().item()
    metrics["exit_sweep"] = [evaluate_early_exit(model, data.val, t) for t in DEFAULT_THRESHOLDS]
    metrics["exit_stage2_epochs"] = n2
    metrics["exits"] = sorted(set(exits))
    save_model(out, model, classes=data.classes, task="multiclass", data=data.description)
    write_metrics(out, metrics)
    return StageResult(out, model, metrics)


def evaluate_exit_run(
    run: str | os.PathLike,
    threshold: float,
    *,
    data: str | None = None,
    output: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> tuple[dict[str, Any], Path]:
    """Per-sample early-exit evaluation of a run with exit heads at ``threshold``."""

    if threshold < 0:
        raise VitkitError(f"--exit-threshold must be >= 0 (a softmax confidence), got {threshold}")
    source = Run.open(run)
    info = source.info
    model = source.model()
    if not exit_blocks(model):
        raise VitkitError(f"run '{run}' has no exit heads: train it with `vitkit train ... --exits 4,8`")
    dataset = source.eval_data(data, model_input_size(model)[1])
    metrics = evaluate_early_exit(model, dataset, threshold, batch_size=batch_size)
    out = Path(output) if output else info.path / f"eval-{slug(data or dataset.name)}-exit{threshold:g}"
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out, {**metrics, "run": str(info.path), "data": dataset.name})
    return metrics, out

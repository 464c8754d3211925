"""``vitkit train`` and ``vitkit evaluate``."""

import os
from pathlib import Path

import typer

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.cli.options import ConfigOpt as C
from vitkit.config.train import TrainConfig
from vitkit.errors import VitkitError
from vitkit.io import check_output
from vitkit.progress import console


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@app.command(rich_help_panel="Train")
def train(
    output: Path | None = Opt(None, "-o", "--output", help="new run directory to write"),
    config: Path | None = Opt(
        None, "--config", "-c", help="YAML file of TrainConfig fields; flags override it"
    ),
    resume: Path | None = Opt(None, "--resume", help="continue this run directory from its checkpoint"),
    force: bool = Opt(False, "--force", help="replace a non-empty output directory"),
    quiet: bool = Opt(False, "--quiet", "-q", help="no progress bar or per-epoch lines"),
    task: str | None = C(TrainConfig, "task"),
    model: str | None = C(TrainConfig, "model"),
    data: str | None = C(TrainConfig, "data"),
    img_size: int | None = C(TrainConfig, "img_size"),
    in_chans: int | None = C(TrainConfig, "in_chans"),
    pretrained_file: str | None = C(TrainConfig, "pretrained_file"),
    transform: list[str] | None = C(
        TrainConfig, "transforms", "--transform", extra="repeatable; e.g. gmm:k=5"
    ),
    epochs: int | None = C(TrainConfig, "epochs"),
    batch_size: int | None = C(TrainConfig, "batch_size"),
    accum_steps: int | None = C(TrainConfig, "accum_steps"),
    optimizer: str | None = C(TrainConfig, "optimizer"),
    lr: float | None = C(TrainConfig, "lr", extra="adamw 1e-3, lion 1e-4, sgd 0.05"),
    weight_decay: float | None = C(TrainConfig, "weight_decay"),
    layer_decay: float | None = C(TrainConfig, "layer_decay"),
    sched: str | None = C(TrainConfig, "sched"),
    warmup_epochs: float | None = C(TrainConfig, "warmup_epochs"),
    min_lr: float | None = C(TrainConfig, "min_lr"),
    clip_grad: float | None = C(TrainConfig, "clip_grad"),
    ema_decay: float | None = C(TrainConfig, "ema_decay"),
    drop_path: float | None = C(TrainConfig, "drop_path"),
    label_smoothing: float | None = C(TrainConfig, "label_smoothing"),
    scale_min: float | None = C(TrainConfig, "scale_min"),
    translate: float | None = C(TrainConfig, "translate"),
    hflip: float | None = C(TrainConfig, "hflip"),
    randaug: str | None = C(TrainConfig, "randaug"),
    mixup: float | None = C(TrainConfig, "mixup"),
    cutmix: float | None = C(TrainConfig, "cutmix"),
    reprob: float | None = C(TrainConfig, "reprob"),
    mixup_off_epoch: int | None = C(TrainConfig, "mixup_off_epoch"),
    sampler: str | None = C(TrainConfig, "sampler"),
    longtail: float | None = C(TrainConfig, "longtail"),
    val_fraction: float | None = C(TrainConfig, "val_fraction"),
    split_seed: int | None = C(TrainConfig, "split_seed"),
    train_size: int | None = C(TrainConfig, "train_size"),
    val_size: int | None = C(TrainConfig, "val_size"),
    strict: bool | None = C(TrainConfig, "strict_data", "--strict/--no-strict"),
    loss: str | None = C(TrainConfig, "loss"),
    precision: str | None = C(TrainConfig, "precision"),
    compile: bool | None = C(TrainConfig, "compile", "--compile/--no-compile"),
    device: str | None = C(TrainConfig, "device"),
    threads: int | None = C(TrainConfig, "threads"),
    seed: int | None = C(TrainConfig, "seed"),
    eval_every: int | None = C(TrainConfig, "eval_every"),
    tensorboard: bool | None = C(TrainConfig, "tensorboard", "--tensorboard/--no-tensorboard"),
    exits: str | None = Opt(
        None, help="LGViT early-exit heads after these many blocks, e.g. 4,8 (trains in two stages)"
    ),
    exit_epochs: int | None = Opt(
        None, help="epochs of exit self-distillation, backbone frozen [default: epochs/3]"
    ),
    repavit: float | None = Opt(None, help="RePaViT channel-idle FFN with this idle fraction θ, e.g. 0.75"),
    linear_attention: bool = Opt(
        False, "--linear-attention", help="L²ViT linear attention (+ local concentration) in every block"
    ),
) -> None:
    """Train a model (from scratch or from --pretrained-file) into a new run directory."""
    from vitkit.stages.train import resume_config, train_model
    from vitkit.train import TrainingInterrupted, build_config

    overrides = dict(
        task=task,
        model=model,
        data=data,
        img_size=img_size,
        in_chans=in_chans,
        pretrained_file=pretrained_file,
        transforms=transform or None,
        epochs=epochs,
        batch_size=batch_size,
        accum_steps=accum_steps,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        sched=sched,
        warmup_epochs=warmup_epochs,
        min_lr=min_lr,
        clip_grad=clip_grad,
        ema_decay=ema_decay,
        drop_path=drop_path,
        label_smoothing=label_smoothing,
        scale_min=scale_min,
        translate=translate,
        hflip=hflip,
        randaug=randaug,
        mixup=mixup,
        cutmix=cutmix,
        reprob=reprob,
        mixup_off_epoch=mixup_off_epoch,
        sampler=sampler,
        longtail=longtail,
        val_fraction=val_fraction,
        split_seed=split_seed,
        train_size=train_size,
        val_size=val_size,
        strict_data=strict,
        loss=loss,
        precision=precision,
        compile=compile,
        device=device,
        threads=threads,
        seed=seed,
        eval_every=eval_every,
        tensorboard=tensorboard,
    )
    if resume is not None:
        if output is not None and Path(output) != Path(resume):
            raise VitkitError("--resume continues a run in place; drop -o (or give the same directory)")
        if config is not None:
            raise VitkitError(
                "--resume uses the run's own config.yaml; pass changes (e.g. --epochs) as flags"
            )
        cfg = resume_config(resume, **overrides)
        output = resume
    else:
        if output is None:
            raise VitkitError("say where to write the run with -o/--output (e.g. -o runs/a)")
        if _is_main():  # other ranks find the directory rank 0 made
            check_output(output, "dir", force=force)
        cfg = build_config(config, **overrides)
    compressed = exits is not None or repavit is not None or linear_attention
    if compressed and resume is not None:
        raise VitkitError("--resume does not rebuild --exits/--repavit/--linear-attention models; train anew")
    try:
        if compressed:
            from vitkit.compress._blocks import parse_int_list
            from vitkit.stages.compress import train_compressed

            run = train_compressed(
                cfg,
                output,
                exits=parse_int_list(exits, "--exits") if exits is not None else None,
                distill_epochs=exit_epochs,
                repavit=repavit,
                linear_attention=linear_attention,
                force=force,
                quiet=quiet,
            )
        else:
            run = train_model(cfg, output, resume=resume is not None, force=force, quiet=quiet)
    except TrainingInterrupted as e:
        if _is_main():
            console.print(f"[yellow]{e}[/]; continue with: vitkit train --resume {output}")
        raise typer.Exit(130) from e
    if _is_main():
        _print_summary(run.path, run.metrics)


def _print_summary(path: Path, metrics: dict, written: list[str] | None = None) -> None:
    """The metrics table and the files this command wrote: ``written`` (those of them that exist),
    or, for a new run directory, what is in it (which files depend on the task and the options)."""
    from rich.table import Table

    groups = metrics.get("shot_classes") or {}
    show_shots = sum(bool(v) for v in groups.values()) > 1  # only informative on long-tailed data

    t = Table(title=f"run {path}", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in (
        "top1",
        "top5",
        "balanced_accuracy",
        "macro_f1",
        "ece",
        "many_shot_accuracy",
        "medium_shot_accuracy",
        "few_shot_accuracy",
        "mean_auroc",
        "mAP",
        "map_at_r",
        "r_precision",
        "recall_at_1",
        "recall_at_5",
        "recall_at_10",
        "parameters",
        "train_seconds",
        "precision",
    ):
        v = metrics.get(key)
        if v is None or (key.endswith("shot_accuracy") and not show_shots):
            continue
        t.add_row(key, f"{v:.4f}" if isinstance(v, float) and key != "train_seconds" else str(v))
    console.print(t)
    if written is None:
        names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        names = [w for w in written if (path / w).is_file()]
    console.print(f"written: {path}/ ({', '.join(names)})")


@app.command(rich_help_panel="Evaluate")
def evaluate(
    run: Path = Arg(..., help="run directory"),
    data: str | None = Opt(None, help="dataset URI [default: the run's own validation split]"),
    output: Path | None = Opt(
        None, "-o", "--output", help="where to write metrics.json [default: RUN/eval-DATA]"
    ),
    batch_size: int = Opt(256),
    many: int = Opt(100, help="classes with more training samples than this are many-shot"),
    few: int = Opt(20, help="classes with fewer training samples than this are few-shot"),
    strict: bool = Opt(False, "--strict", help="fail on unreadable images instead of skipping"),
    device: str = Opt("cpu"),
    probe: str | None = Opt(
        None, help="linear | knn: fit a probe on frozen features of the train split, score the val split"
    ),
    layer: int | None = Opt(None, help="probe: features after this block [default: pooled features]"),
    pool: str = Opt("avg", help="probe with --layer: avg (patch tokens) | cls"),
    exit_threshold: float | None = Opt(
        None,
        help="early exit: each image leaves at the first exit head this confident (runs trained with --exits)",
    ),
) -> None:
    """Evaluate a run: top-1/5, per-class, balanced, many/medium/few-shot, macro-F1, ECE (AUROC/mAP for multi-label)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir")
    from vitkit.stages.evaluate import evaluate_run

    if probe is not None:
        from vitkit.adapt.probes import probe_run

        result, out = probe_run(
            run,
            {"method": probe, "layer": layer, "pool": pool, "batch_size": batch_size},
            data=data,
            output=output,
            device=device,
        )
        _print_summary(
            out,
            {"top1": result.top1, "balanced_accuracy": result.balanced_accuracy},
            written=["metrics.json"],
        )
        return
    if exit_threshold is not None:
        from vitkit.stages.compress import evaluate_exit_run

        metrics, out = evaluate_exit_run(run, exit_threshold, data=data, output=output, batch_size=batch_size)
        _print_exit_summary(out, metrics)
        return

    metrics, out = evaluate_run(
        run,
        data,
        output=output,
        batch_size=batch_size,
        many_threshold=many,
        few_threshold=few,
        strict=strict,
        device=device,
    )
    # the task's files only (confusion_matrix.png for single-label data, ...): an older file in `out`
    # is not ours to list
    from vitkit.runs import read_run
    from vitkit.stages.common import run_task

    _print_summary(out, metrics, written=run_task(read_run(run)).output_files(metrics))


def _print_exit_summary(path: Path, m: dict) -> None:
    console.print(
        f"early exit at threshold {m['threshold']:g}: top-1 {m['top1']:.4f}, mean blocks "
        f"{m['mean_blocks']:.2f} of {m['depth']}, exits {m['exit_histogram']}"
    )
    console.print(f"written: {path}/metrics.json")

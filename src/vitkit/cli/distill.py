"""``vitkit distill`` (DeiT, DeiT-LT, G2SD, ScaleKD) and ``vitkit evaluate-heads``."""

from pathlib import Path

import typer

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.errors import VitkitError
from vitkit.io import check_output
from vitkit.progress import console


@app.command(rich_help_panel="Train")
def distill(
    output: Path | None = Opt(None, "-o", "--output", help="new run directory to write"),
    student: str | None = Opt(
        None, help="student model (timm/vitkit name) [default: vitkit_micro_distilled_p4_16]"
    ),
    teacher: str = Opt(..., help="teacher: a run directory, or a timm name with --teacher-weights"),
    method: str = Opt("deit", help="deit | deit-lt | g2sd | scalekd"),
    config: Path | None = Opt(None, "--config", "-c", help="YAML of TrainConfig fields for the student"),
    force: bool = Opt(False, "--force", help="replace a non-empty output directory"),
    quiet: bool = Opt(False, "--quiet", "-q"),
    teacher_weights: str | None = Opt(None, help="local weights for a teacher given by timm name"),
    teacher_size: int | None = Opt(
        None, help="teacher input side [default: its own] (DeiT-LT --teacher-size)"
    ),
    add_dist_token: bool = Opt(False, "--add-dist-token", help="give a plain ViT student a DIST token"),
    dist_token_init: str = Opt("random", help="random | copy_cls (initialise the DIST token from CLS)"),
    # DeiT / DeiT-LT
    distillation: str | None = Opt(None, help="deit: hard | soft [default: hard]"),
    alpha: float | None = Opt(None, help="weight of the distillation loss [default: 0.5]"),
    tau: float | None = Opt(None, help="deit soft: temperature [default: 1]"),
    kl_reduction: str | None = Opt(None, help="deit soft: deit (÷B·C) | batchmean (÷B)"),
    drw: float | None = Opt(
        None, help="deit-lt: DRW start, a fraction of training (0.8) or an epoch index [default: 0.8]"
    ),
    beta: float | None = Opt(None, help="deit-lt: effective-number beta [default: 0.9999]"),
    weighted_base: bool | None = Opt(
        None, "--weighted-base/--no-weighted-base", help="deit-lt: re-weight the CLS loss too"
    ),
    no_mixup_drw: bool | None = Opt(
        None, "--no-mixup-drw/--mixup-drw", help="deit-lt: mixup off during DRW [default: off]"
    ),
    # feature distillation
    student_layer: int | None = Opt(
        None, help="g2sd/scalekd: student feature index (timm feature_info) [-1]"
    ),
    teacher_layer: int | None = Opt(None, help="g2sd/scalekd: teacher feature index [-1]"),
    feature_weight: float | None = Opt(None, help="g2sd: weight of the feature loss [1]"),
    ce_weight: float | None = Opt(None, help="g2sd: weight of the label loss [1]"),
    generic_epochs: int = Opt(
        0, help="g2sd: epochs of the generic (feature-only) stage before the specific stage"
    ),
    kd_alpha: float | None = Opt(None, help="scalekd: weight of logit KD [0.5]"),
    alpha_spatial: float | None = Opt(None, help="scalekd: spatial mimicking weight [0.08]"),
    alpha_freq: float | None = Opt(None, help="scalekd: frequency mimicking weight [0.06]"),
    # the student's training
    data: str | None = Opt(None, help="digits | fashion-mnist | folder:PATH | csv:PATH | npz:PATH"),
    longtail: float | None = Opt(None, help="long-tail imbalance factor ρ (exponential profile)"),
    img_size: int | None = Opt(None, help="student input side [default: the model's]"),
    pretrained_file: str | None = Opt(None, help="local weights to start the student from"),
    epochs: int | None = Opt(None),
    batch_size: int | None = Opt(None),
    optimizer: str | None = Opt(None),
    lr: float | None = Opt(None),
    weight_decay: float | None = Opt(None),
    warmup_epochs: float | None = Opt(None),
    label_smoothing: float | None = Opt(None),
    drop_path: float | None = Opt(None),
    randaug: str | None = Opt(None, help="timm RandAugment string (deit-lt default: rand-m9-mstd0.5-inc1)"),
    mixup: float | None = Opt(None, help="(deit-lt default 0.8)"),
    cutmix: float | None = Opt(None, help="(deit-lt default 1.0)"),
    reprob: float | None = Opt(None, help="(deit-lt default 0.25)"),
    scale_min: float | None = Opt(None),
    translate: float | None = Opt(None),
    hflip: float | None = Opt(None),
    sampler: str | None = Opt(None, help="random | balanced | sqrt"),
    train_size: int | None = Opt(None),
    val_size: int | None = Opt(None),
    eval_every: int | None = Opt(None),
    seed: int | None = Opt(None),
    threads: int | None = Opt(None),
    device: str | None = Opt(None),
    tensorboard: bool | None = Opt(None, "--tensorboard/--no-tensorboard"),
) -> None:
    """Distil a teacher into a student: DeiT token distillation, DeiT-LT (long-tailed data), G2SD or ScaleKD feature distillation."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir", force=force)
    from vitkit.stages.distill import distill as run_distill
    from vitkit.train import TrainingInterrupted, build_config

    if output is None:
        raise VitkitError("say where to write the run with -o/--output (e.g. -o runs/student)")
    overrides = dict(
        model=student,
        data=data,
        longtail=longtail,
        img_size=img_size,
        pretrained_file=pretrained_file,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        drop_path=drop_path,
        randaug=randaug,
        mixup=mixup,
        cutmix=cutmix,
        reprob=reprob,
        scale_min=scale_min,
        translate=translate,
        hflip=hflip,
        sampler=sampler,
        train_size=train_size,
        val_size=val_size,
        eval_every=eval_every,
        seed=seed,
        threads=threads,
        device=device,
        tensorboard=tensorboard,
    )
    if student is None and config is None:
        overrides["model"] = "vitkit_micro_distilled_p4_16"
    cfg = build_config(config, **overrides)
    options = {
        "deit": dict(distillation=distillation, alpha=alpha, tau=tau, kl_reduction=kl_reduction),
        "deit-lt": dict(
            alpha=alpha, drw=_drw(drw), beta=beta, weighted_base=weighted_base, no_mixup_drw=no_mixup_drw
        ),
        "g2sd": dict(
            student_layer=student_layer,
            teacher_layer=teacher_layer,
            feature_weight=feature_weight,
            ce_weight=ce_weight,
        ),
        "scalekd": dict(
            student_layer=student_layer,
            teacher_layer=teacher_layer,
            kd_alpha=kd_alpha,
            alpha_spatial=alpha_spatial,
            alpha_freq=alpha_freq,
            tau=tau,
        ),
    }.get(method)
    if options is None:
        raise VitkitError(f"unknown --method '{method}': expected deit, deit-lt, g2sd or scalekd")
    _refuse_foreign_options(
        method,
        dict(
            distillation=distillation,
            kl_reduction=kl_reduction,
            drw=drw,
            beta=beta,
            weighted_base=weighted_base,
            no_mixup_drw=no_mixup_drw,
            student_layer=student_layer,
            teacher_layer=teacher_layer,
            feature_weight=feature_weight,
            ce_weight=ce_weight,
            kd_alpha=kd_alpha,
            alpha_spatial=alpha_spatial,
            alpha_freq=alpha_freq,
        ),
        options,
    )
    try:
        run = run_distill(
            cfg,
            output,
            teacher=teacher,
            method=method,
            options=options,
            teacher_weights=teacher_weights,
            teacher_size=teacher_size,
            add_dist_token=add_dist_token,
            dist_token_init=dist_token_init,
            generic_epochs=generic_epochs,
            force=force,
            quiet=quiet,
        )
    except TrainingInterrupted as e:
        console.print(f"[yellow]{e}[/]")
        raise typer.Exit(130) from e
    print_heads(run.path, run.metrics)


def _drw(v: float | None):
    if v is None:
        return None
    return int(v) if float(v).is_integer() else float(v)


def _refuse_foreign_options(method: str, given: dict, accepted: dict) -> None:
    for k, v in given.items():
        if v is not None and k not in accepted:
            flag = "--" + k.replace("_", "-")
            raise VitkitError(f"{flag} does not apply to --method {method}")


def print_heads(path: Path, metrics: dict) -> None:
    from rich.table import Table

    def fmt(v) -> str:
        return "—" if v is None else f"{v:.4f}"

    t = Table(title=f"run {path}")
    t.add_column("predictor")
    for c in ("top1", "balanced", "many-shot", "medium-shot", "few-shot"):
        t.add_column(c, justify="right")
    rows = dict(metrics.get("heads", {}))
    if not rows:
        rows["student"] = {k: metrics.get(k) for k in ("top1", "balanced_accuracy")} | {
            f"{g}_shot_accuracy": metrics.get(f"{g}_shot_accuracy") for g in ("many", "medium", "few")
        }
    if "teacher" in metrics:
        rows["teacher"] = metrics["teacher"]
    for name, m in rows.items():
        t.add_row(
            name,
            fmt(m.get("top1")),
            fmt(m.get("balanced_accuracy")),
            *(fmt(m.get(f"{g}_shot_accuracy")) for g in ("many", "medium", "few")),
        )
    console.print(t)
    console.print(
        f"written: {path}/ (model.json, model.safetensors, metrics.json, distill.yaml, history.csv)"
    )


@app.command("evaluate-heads", rich_help_panel="Evaluate")
def evaluate_heads_cmd(
    run: Path = Arg(..., help="run directory of a student with a DIST token"),
    data: str | None = Opt(None, help="dataset URI [default: the run's own validation split]"),
    output: Path | None = Opt(
        None, "-o", "--output", help="where to write metrics.json [default: RUN/heads-DATA]"
    ),
    many: int = Opt(100, help="classes with more training samples than this are many-shot"),
    few: int = Opt(20, help="classes with fewer training samples than this are few-shot"),
    device: str = Opt("cpu"),
) -> None:
    """Evaluate the CLS head, the DIST head and their mean of a distilled run (many/medium/few-shot each)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir")
    from vitkit.stages.distill import evaluate_run_heads

    metrics, out = evaluate_run_heads(
        run, data, output=output, many_threshold=many, few_threshold=few, device=device
    )
    print_heads(out, metrics)

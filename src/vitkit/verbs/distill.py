"""``vitkit distill`` (DeiT, DeiT-LT, G2SD, ScaleKD) and ``vitkit evaluate-heads``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from pydantic import ValidationInfo, field_validator

from vitkit.config.train import TrainConfig
from vitkit.errors import VitkitError
from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb

Method = Literal["deit", "deit-lt", "g2sd", "scalekd"]
METHODS = get_args(Method)
#: method -> the method options it takes (``alpha`` and ``tau`` are ignored where they do not apply)
ACCEPTS: dict[str, set[str]] = {
    "deit": {"distillation", "alpha", "tau", "kl_reduction"},
    "deit-lt": {"alpha", "drw", "beta", "weighted_base", "no_mixup_drw"},
    "g2sd": {"student_layer", "teacher_layer", "feature_weight", "ce_weight"},
    "scalekd": {"student_layer", "teacher_layer", "kd_alpha", "alpha_spatial", "alpha_freq", "tau"},
}
#: method options refused (one error line) when the method does not take them
METHOD_ONLY = ("distillation", "kl_reduction", "drw", "beta", "weighted_base", "no_mixup_drw",
               "student_layer", "teacher_layer", "feature_weight", "ce_weight", "kd_alpha",
               "alpha_spatial", "alpha_freq")  # fmt: skip


def _student(field: str) -> str:
    """The help of a student training option: the TrainConfig field's description."""
    return TrainConfig.model_fields[field].description or field.replace("_", " ")


class DistillOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o", "config": "-c", "quiet": "-q"}

    output: Path | None = option(None, help="new run directory to write")
    student: str | None = option(
        None, help="student model (timm/vitkit name) [default: vitkit_micro_distilled_p4_16]"
    )
    teacher: str = option(..., help="teacher: a run directory, or a timm name with --teacher-weights")
    method: Method = option("deit", help="deit | deit-lt | g2sd | scalekd")
    config: Path | None = option(None, help="YAML of TrainConfig fields for the student")
    force: bool = option(False, help="replace a non-empty output directory")
    quiet: bool = option(False, help="no progress bar or per-epoch lines")
    teacher_weights: str | None = option(None, help="local weights for a teacher given by timm name")
    teacher_size: int | None = option(
        None, help="teacher input side [default: its own] (DeiT-LT --teacher-size)"
    )
    add_dist_token: bool = option(False, help="give a plain ViT student a DIST token")
    dist_token_init: str = option("random", help="random | copy_cls (initialise the DIST token from CLS)")
    # DeiT / DeiT-LT
    distillation: str | None = option(None, help="deit: hard | soft [default: hard]")
    alpha: float | None = option(None, help="weight of the distillation loss [default: 0.5]")
    tau: float | None = option(None, help="deit soft: temperature [default: 1]")
    kl_reduction: str | None = option(None, help="deit soft: deit (÷B·C) | batchmean (÷B)")
    drw: float | None = option(
        None, help="deit-lt: DRW start, a fraction of training (0.8) or an epoch index [default: 0.8]"
    )
    beta: float | None = option(None, help="deit-lt: effective-number beta [default: 0.9999]")
    weighted_base: bool | None = option(
        None, "--weighted-base/--no-weighted-base", help="deit-lt: re-weight the CLS loss too"
    )
    no_mixup_drw: bool | None = option(
        None, "--no-mixup-drw/--mixup-drw", help="deit-lt: mixup off during DRW [default: off]"
    )
    # feature distillation
    student_layer: int | None = option(
        None, help="g2sd/scalekd: student feature index (timm feature_info) [-1]"
    )
    teacher_layer: int | None = option(None, help="g2sd/scalekd: teacher feature index [-1]")
    feature_weight: float | None = option(None, help="g2sd: weight of the feature loss [1]")
    ce_weight: float | None = option(None, help="g2sd: weight of the label loss [1]")
    generic_epochs: int = option(
        0, help="g2sd: epochs of the generic (feature-only) stage before the specific stage"
    )
    kd_alpha: float | None = option(None, help="scalekd: weight of logit KD [0.5]")
    alpha_spatial: float | None = option(None, help="scalekd: spatial mimicking weight [0.08]")
    alpha_freq: float | None = option(None, help="scalekd: frequency mimicking weight [0.06]")
    # the student's training
    data: str | None = option(None, help="digits | fashion-mnist | folder:PATH | csv:PATH | npz:PATH")
    longtail: float | None = option(None, help="long-tail imbalance factor ρ (exponential profile)")
    img_size: int | None = option(None, help="student input side [default: the model's]")
    pretrained_file: str | None = option(None, help="local weights to start the student from")
    epochs: int | None = option(None, help=_student("epochs"))
    batch_size: int | None = option(None, help=_student("batch_size"))
    optimizer: str | None = option(None, help=_student("optimizer"))
    lr: float | None = option(None, help=_student("lr"))
    weight_decay: float | None = option(None, help=_student("weight_decay"))
    warmup_epochs: float | None = option(None, help=_student("warmup_epochs"))
    label_smoothing: float | None = option(None, help=_student("label_smoothing"))
    drop_path: float | None = option(None, help=_student("drop_path"))
    randaug: str | None = option(None, help="timm RandAugment string (deit-lt default: rand-m9-mstd0.5-inc1)")
    mixup: float | None = option(None, help="(deit-lt default 0.8)")
    cutmix: float | None = option(None, help="(deit-lt default 1.0)")
    reprob: float | None = option(None, help="(deit-lt default 0.25)")
    scale_min: float | None = option(None, help=_student("scale_min"))
    translate: float | None = option(None, help=_student("translate"))
    hflip: float | None = option(None, help=_student("hflip"))
    sampler: str | None = option(None, help="random | balanced | sqrt")
    train_size: int | None = option(None, help=_student("train_size"))
    val_size: int | None = option(None, help=_student("val_size"))
    eval_every: int | None = option(None, help=_student("eval_every"))
    seed: int | None = option(None, help=_student("seed"))
    threads: int | None = option(None, help=_student("threads"))
    device: str | None = option(None, help=_student("device"))
    tensorboard: bool | None = option(None, "--tensorboard/--no-tensorboard", help=_student("tensorboard"))

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, v: Any) -> Any:
        if v not in METHODS:
            raise ValueError(f"unknown --method '{v}': expected deit, deit-lt, g2sd or scalekd")
        return v

    @field_validator(*METHOD_ONLY)
    @classmethod
    def _applies_to_method(cls, v: Any, info: ValidationInfo) -> Any:
        method = info.data.get("method")  # absent when the method itself was refused
        if v is not None and method in ACCEPTS and info.field_name not in ACCEPTS[method]:
            flag = "--" + str(info.field_name).replace("_", "-")
            raise ValueError(f"{flag} does not apply to --method {method}")
        return v


#: the student's training options (DistillOptions fields of the same name as their TrainConfig field)
STUDENT_TRAINING = ("data", "longtail", "img_size", "pretrained_file", "epochs", "batch_size",
                    "optimizer", "lr", "weight_decay", "warmup_epochs", "label_smoothing", "drop_path",
                    "randaug", "mixup", "cutmix", "reprob", "scale_min", "translate", "hflip", "sampler",
                    "train_size", "val_size", "eval_every", "seed", "threads", "device", "tensorboard")  # fmt: skip


def distill(o: DistillOptions) -> None:
    """Distil a teacher into a student: DeiT token distillation, DeiT-LT (long-tailed data), G2SD or ScaleKD feature distillation."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir", force=o.force)
    from vitkit.stages.distill import distill as run_distill
    from vitkit.train import TrainingInterrupted, build_config

    if o.output is None:
        raise VitkitError("say where to write the run with -o/--output (e.g. -o runs/student)")
    overrides = {"model": o.student, **{f: getattr(o, f) for f in STUDENT_TRAINING}}
    if o.student is None and o.config is None:
        overrides["model"] = "vitkit_micro_distilled_p4_16"
    cfg = build_config(o.config, **overrides)
    options = {
        "deit": dict(distillation=o.distillation, alpha=o.alpha, tau=o.tau, kl_reduction=o.kl_reduction),
        "deit-lt": dict(
            alpha=o.alpha,
            drw=_drw(o.drw),
            beta=o.beta,
            weighted_base=o.weighted_base,
            no_mixup_drw=o.no_mixup_drw,
        ),
        "g2sd": dict(
            student_layer=o.student_layer,
            teacher_layer=o.teacher_layer,
            feature_weight=o.feature_weight,
            ce_weight=o.ce_weight,
        ),
        "scalekd": dict(
            student_layer=o.student_layer,
            teacher_layer=o.teacher_layer,
            kd_alpha=o.kd_alpha,
            alpha_spatial=o.alpha_spatial,
            alpha_freq=o.alpha_freq,
            tau=o.tau,
        ),
    }[o.method]
    try:
        run = run_distill(
            cfg,
            o.output,
            teacher=o.teacher,
            method=o.method,
            options=options,
            teacher_weights=o.teacher_weights,
            teacher_size=o.teacher_size,
            add_dist_token=o.add_dist_token,
            dist_token_init=o.dist_token_init,
            generic_epochs=o.generic_epochs,
            force=o.force,
            quiet=o.quiet,
        )
    except TrainingInterrupted as e:
        console.print(f"[yellow]{e}[/]")
        raise KeyboardInterrupt from e  # the CLI exits 130; a pipeline stops
    print_heads(run.path, run.metrics)


def _drw(v: float | None):
    if v is None:
        return None
    return int(v) if float(v).is_integer() else float(v)


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


class EvaluateHeadsOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    run: Path = argument(help="run directory of a student with a DIST token")
    data: str | None = option(None, help="dataset URI [default: the run's own validation split]")
    output: Path | None = option(None, help="where to write metrics.json [default: RUN/heads-DATA]")
    many: int = option(100, help="classes with more training samples than this are many-shot")
    few: int = option(20, help="classes with fewer training samples than this are few-shot")
    device: str = option("cpu", help="torch device: cpu | cuda[:N]")


def evaluate_heads(o: EvaluateHeadsOptions) -> None:
    """Evaluate the CLS head, the DIST head and their mean of a distilled run (many/medium/few-shot each)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir")
    from vitkit.stages.distill import evaluate_run_heads

    metrics, out = evaluate_run_heads(
        o.run, o.data, output=o.output, many_threshold=o.many, few_threshold=o.few, device=o.device
    )
    print_heads(out, metrics)


register_verb(Verb("distill", DistillOptions, distill, panel="Train", produces=True))
register_verb(Verb("evaluate-heads", EvaluateHeadsOptions, evaluate_heads, panel="Evaluate", input="run"))

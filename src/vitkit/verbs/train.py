"""``vitkit train`` and ``vitkit evaluate``.

The options of ``vitkit train`` that set a :class:`~vitkit.config.train.TrainConfig` field are
generated from ``TrainConfig.model_fields`` (one option each, default None: a missing flag leaves the
``--config`` file's value or the config's default; the help is the field's description and default).
Only the verb's own options are written here.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import create_model

from vitkit.config import field_help
from vitkit.config.train import TrainConfig
from vitkit.errors import VitkitError
from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb

#: TrainConfig fields deliberately without a ``vitkit train`` option, and why: a ``--config`` file
#: sets them (tests/cli/test_train_options.py fails on a new field that is neither here nor an option)
HIDDEN: dict[str, str] = {
    "model_kwargs": "a mapping of timm constructor arguments, which a flag cannot say",
    "momentum": "never was a flag (SGD momentum, default 0.9)",
}
#: TrainConfig field -> the option's name where they differ (the flag follows the option's name)
OPTION_NAME: dict[str, str] = {"transforms": "transform", "strict_data": "strict"}
#: TrainConfig field -> what the option's help adds to the field's description
EXTRA_HELP: dict[str, str] = {
    "transforms": "repeatable; e.g. gmm:k=5",
    "lr": "adamw 1e-3, lion 1e-4, sgd 0.05",
}


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _option_type(annotation: Any) -> Any:
    """The type of the option for a config field of this type, or None where a command line cannot
    say it (a mapping, a nested model). Constraints and choices are left to ``TrainConfig``, which
    names the field in its error (``config: field 'precision': ...``) and knows the ``--config`` file's
    values too."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is Literal:
        return type(typing.get_args(annotation)[0])
    if origin is list:
        inner = _option_type(args[0]) if args else None
        return list[inner] if inner in (str, int, float) else None
    if origin is not None and args:  # X | None
        return _option_type(args[0]) if len(args) == 1 else None
    return annotation if annotation in (str, int, float, bool) else None


def config_options() -> dict[str, str]:
    """TrainConfig field -> the ``vitkit train`` option that sets it."""
    return {
        name: OPTION_NAME.get(name, name)
        for name, info in TrainConfig.model_fields.items()
        if name not in HIDDEN and _option_type(info.annotation) is not None
    }


def _config_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, opt in config_options().items():
        typ = _option_type(TrainConfig.model_fields[name].annotation)
        flag = "--" + opt.replace("_", "-")
        decls = (f"{flag}/--no-{flag[2:]}",) if typ is bool else ()
        help_text = field_help(TrainConfig, name, EXTRA_HELP.get(name))
        fields[opt] = (typ | None, option(None, *decls, help=help_text))
    return fields


class _TrainOwnOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o", "config": "-c", "quiet": "-q"}

    output: Path | None = option(None, help="new run directory to write")
    config: Path | None = option(None, help="YAML file of TrainConfig fields; flags override it")
    resume: Path | None = option(None, help="continue this run directory from its checkpoint")
    force: bool = option(False, help="replace a non-empty output directory")
    quiet: bool = option(False, help="no progress bar or per-epoch lines")


TrainOptions = create_model(
    "TrainOptions",
    __base__=_TrainOwnOptions,
    __module__=__name__,
    **_config_fields(),
    exits=(
        str | None,
        option(None, help="LGViT early-exit heads after these many blocks, e.g. 4,8 (trains in two stages)"),
    ),
    exit_epochs=(
        int | None,
        option(None, help="epochs of exit self-distillation, backbone frozen [default: epochs/3]"),
    ),
    repavit=(
        float | None,
        option(
            None,
            help="RePaViT channel-idle FFN with this idle fraction θ, e.g. 0.75 (= --transform repavit:idle=θ)",
        ),
    ),
    linear_attention=(
        bool,
        option(
            False,
            help="L²ViT linear attention (+ local concentration) in every block (= --transform linear_attention)",
        ),
    ),
)
TrainOptions.__doc__ = "The options of ``vitkit train``: its own, then one per exposed TrainConfig field."


def train(o: TrainOptions) -> None:
    """Train a model (from scratch or from --pretrained-file) into a new run directory."""
    from vitkit.stages.train import resume_config, train_model
    from vitkit.train import TrainingInterrupted, build_config

    overrides = {name: getattr(o, opt) for name, opt in config_options().items()}
    overrides["transforms"] = overrides["transforms"] or None  # none given: a --config file's list stays
    output = o.output
    if o.resume is not None:
        if output is not None and Path(output) != Path(o.resume):
            raise VitkitError("--resume continues a run in place; drop -o (or give the same directory)")
        if o.config is not None:
            raise VitkitError(
                "--resume uses the run's own config.yaml; pass changes (e.g. --epochs) as flags"
            )
        cfg = resume_config(o.resume, **overrides)
        output = o.resume
    else:
        if output is None:
            raise VitkitError("say where to write the run with -o/--output (e.g. -o runs/a)")
        if _is_main():  # other ranks find the directory rank 0 made
            check_output(output, "dir", force=o.force)
        cfg = build_config(o.config, **overrides)
    # --repavit and --linear-attention are shorthands for their --transform (applied before training)
    shorthand = ([f"repavit:idle={o.repavit}"] if o.repavit is not None else []) + (
        ["linear_attention"] if o.linear_attention else []
    )
    if shorthand:
        cfg = type(cfg).model_validate({**cfg.model_dump(), "transforms": [*cfg.transforms, *shorthand]})
    if o.exits is not None and o.resume is not None:
        raise VitkitError("--resume does not rebuild --exits models (two training stages); train anew")
    try:
        if o.exits is not None:
            from vitkit.compress._blocks import parse_int_list
            from vitkit.stages.compress import train_with_exits

            run = train_with_exits(
                cfg,
                output,
                exits=parse_int_list(o.exits, "--exits"),
                distill_epochs=o.exit_epochs,
                force=o.force,
                quiet=o.quiet,
            )
        else:
            run = train_model(cfg, output, resume=o.resume is not None, force=o.force, quiet=o.quiet)
    except TrainingInterrupted as e:
        if _is_main():
            console.print(f"[yellow]{e}[/]; continue with: vitkit train --resume {output}")
        raise KeyboardInterrupt from e  # the CLI exits 130; a pipeline stops
    if _is_main():
        print_summary(run.path, run.metrics)


def _task_summary_keys(metrics: dict) -> tuple[str, ...]:
    """The summary keys of the task the metrics name (dense tasks: mIoU, F1, ...)."""
    spec = metrics.get("task")
    if not isinstance(spec, str):
        return ()
    from vitkit.tasks import get_task

    try:
        return get_task(spec).summary_keys
    except VitkitError:  # an unknown task in an old metrics.json: the generic keys still show
        return ()


def print_summary(path: Path, metrics: dict, written: list[str] | None = None) -> None:
    """The metrics table and the files this command wrote: ``written`` (those of them that exist),
    or, for a new run directory, what is in it (which files depend on the task and the options)."""
    from rich.table import Table

    groups = metrics.get("shot_classes") or {}
    show_shots = sum(bool(v) for v in groups.values()) > 1  # only informative on long-tailed data

    t = Table(title=f"run {path}", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in dict.fromkeys(
        (  # the task's keys first, each once
            *_task_summary_keys(metrics),
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
            "group_top1",  # data with group ids (a detect -> crop -> classify pipeline's crops)
            "groups",
            "anomalies",
            "top1_confident",
            "parameters",
            "train_seconds",
            "precision",
        )
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


class EvaluateOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    run: Path = argument(help="run directory")
    data: str | None = option(None, help="dataset URI [default: the run's own validation split]")
    output: Path | None = option(None, help="where to write metrics.json [default: RUN/eval-DATA]")
    batch_size: int = option(256, help="images per evaluation batch")
    many: int = option(100, help="classes with more training samples than this are many-shot")
    few: int = option(20, help="classes with fewer training samples than this are few-shot")
    strict: bool = option(False, help="fail on unreadable images instead of skipping")
    device: str = option("cpu", help="torch device: cpu | cuda[:N]")
    probe: str | None = option(
        None, help="linear | knn: fit a probe on frozen features of the train split, score the val split"
    )
    layer: int | None = option(None, help="probe: features after this block [default: pooled features]")
    pool: str = option("avg", help="probe with --layer: avg (patch tokens) | cls")
    exit_threshold: float | None = option(
        None,
        help="early exit: each image leaves at the first exit head this confident (runs trained with --exits)",
    )
    zero_shot: str | None = option(
        None, help="image-text runs: zero-shot top-1 on this labelled dataset URI from class-name prompts"
    )


def evaluate(o: EvaluateOptions) -> None:
    """Evaluate a run: top-1/5, per-class, balanced, many/medium/few-shot, macro-F1, ECE (AUROC/mAP for multi-label)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir")
    from vitkit.stages.evaluate import evaluate_run

    if o.probe is not None:
        from vitkit.adapt.probes import probe_run

        result, out = probe_run(
            o.run,
            {"method": o.probe, "layer": o.layer, "pool": o.pool, "batch_size": o.batch_size},
            data=o.data,
            output=o.output,
            device=o.device,
        )
        print_summary(
            out,
            {"top1": result.top1, "balanced_accuracy": result.balanced_accuracy},
            written=["metrics.json"],
        )
        return
    if o.zero_shot is not None:
        from vitkit.stages.evaluate import zero_shot_run

        metrics, out = zero_shot_run(
            o.run, o.zero_shot, output=o.output, batch_size=o.batch_size, strict=o.strict, device=o.device
        )
        print_summary(
            out,
            {
                "zero_shot_top1": metrics["zero_shot_top1"],
                "zero_shot_balanced_accuracy": metrics["zero_shot_balanced_accuracy"],
            },
            written=["metrics.json", "zero_shot.png"],
        )
        return
    if o.exit_threshold is not None:
        from vitkit.stages.compress import evaluate_exit_run

        metrics, out = evaluate_exit_run(
            o.run, o.exit_threshold, data=o.data, output=o.output, batch_size=o.batch_size
        )
        _print_exit_summary(out, metrics)
        return

    metrics, out = evaluate_run(
        o.run,
        o.data,
        output=o.output,
        batch_size=o.batch_size,
        many_threshold=o.many,
        few_threshold=o.few,
        strict=o.strict,
        device=o.device,
    )
    # the task's files only (confusion_matrix.png for single-label data, ...): an older file in `out`
    # is not ours to list
    from vitkit.runs import read_run
    from vitkit.stages.common import run_task

    print_summary(out, metrics, written=run_task(read_run(o.run)).output_files(metrics))


def _print_exit_summary(path: Path, m: dict) -> None:
    console.print(
        f"early exit at threshold {m['threshold']:g}: top-1 {m['top1']:.4f}, mean blocks "
        f"{m['mean_blocks']:.2f} of {m['depth']}, exits {m['exit_histogram']}"
    )
    console.print(f"written: {path}/metrics.json")


register_verb(Verb("train", TrainOptions, train, panel="Train", produces=True))
register_verb(Verb("evaluate", EvaluateOptions, evaluate, panel="Evaluate", input="run"))

"""``vitkit pretrain`` (MAE, ExPLoRA stage 1) and ``vitkit finetune`` (full or parameter-efficient).

Both take TrainConfig fields as options too: their help is the field's description (no default shown,
since the recipe and the source run decide it), unless the verb says something of its own there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, ValidationInfo, field_validator

from vitkit.config.train import TrainConfig
from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb


def _train(name: str, help: str | None = None) -> Any:
    """An option for TrainConfig's field ``name``: no value of its own (the YAML file, the recipe and
    TrainConfig decide), help from the field's description unless the verb gives its own."""
    return option(None, help=help or TrainConfig.model_fields[name].description)


def _block_indices(
    text: str | None, flag: str = "--unfreeze-blocks", example: str = "-1 or 0,3"
) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(
            f"{flag}: expected comma-separated block indices such as {example}; got '{text}'"
        ) from None


def _targets(text: str | None) -> list[str] | None:
    return [t for t in text.replace(" ", "").split(",") if t] if text else None


def _loop_fields(o: VerbOptions, names: tuple[str, ...]) -> dict[str, Any]:
    """TrainConfig fields: the ``--config`` YAML file, then the options given on top."""
    from vitkit.train.config import read_config_file

    fields = read_config_file(o.config) if o.config else {}
    fields.update({k: getattr(o, k) for k in names if getattr(o, k) is not None})
    return fields


def _print_run(title: str, path: Path, metrics: dict, keys: tuple[str, ...]) -> None:
    from rich.table import Table

    t = Table(title=f"{title} {path}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in keys:
        v = metrics.get(key)
        if v is None:
            continue
        t.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)


# -- pretrain ------------------------------------------------------------------------------------
PRETRAIN_TRAIN_FIELDS = ("model", "data", "img_size", "in_chans", "epochs", "batch_size", "lr",
                         "weight_decay", "warmup_epochs", "min_lr", "scale_min", "hflip", "train_size",
                         "val_size", "seed", "threads", "device")  # fmt: skip
EXPLORA_FIELDS = ("unfreeze_blocks", "rank", "alpha", "lora")


class PretrainOptions(VerbOptions):
    # defaults validated too: --method explora without --from is an error of the (absent) --from
    model_config = ConfigDict(validate_default=True)
    short: ClassVar[dict[str, str]] = {"config": "-c", "quiet": "-q"}

    output: Path = option(..., "-o", "--output", help="new run directory (the encoder, timm-loadable)")
    method: Literal["mae", "hi-end-mae", "explora"] = option(
        "mae", help="mae | hi-end-mae (decoder driven by intermediate layers) | explora (needs --from)"
    )
    source: Path | None = option(None, "--from", help="continue from this run's encoder (and MAE decoder)")
    recipe: str | None = option(
        None,
        help="mae | hi-end-mae | medical-mae | none: MAE and crop settings; flags override [the method's]",
    )
    config: Path | None = option(None, help="YAML of TrainConfig fields")
    model: str | None = _train("model", "encoder: timm or vitkit ViT name [default: vitkit_micro_p4_16]")
    data: str | None = _train("data", "dataset URI; labels are ignored")
    img_size: int | None = _train("img_size")
    in_chans: int | None = _train("in_chans")
    mask_ratio: float | None = option(None, help="fraction of patches hidden [mae: 0.75, medical: 0.9]")
    decoder_dim: int | None = option(None, help="decoder width [default: the encoder's, ≤ 512]")
    decoder_depth: int | None = option(None, help="decoder blocks [default: 2]")
    decoder_heads: int | None = option(None, help="decoder heads [default: width // 32]")
    norm_pix_loss: bool | None = option(
        None, "--norm-pix-loss/--no-norm-pix-loss", help="normalise each target patch (mean 0, var 1)"
    )
    levels: str | None = option(
        None,
        help="hi-end-mae: encoder blocks (0-based) feeding the cross-attention blocks, deepest first, e.g. 9,6,3",
    )
    unfreeze_blocks: str | None = option(None, help="explora: blocks trained in full, e.g. -1 or 0,-1")
    rank: int | None = option(None, help="explora: LoRA rank [8]")
    alpha: float | None = option(None, help="explora: LoRA alpha [8]")
    lora: str | None = option(None, help="explora: qv (ours, Q/V slices) | qkv (peft, fused qkv)")
    epochs: int | None = _train("epochs")
    batch_size: int | None = _train("batch_size")
    lr: float | None = _train("lr")
    weight_decay: float | None = _train("weight_decay")
    warmup_epochs: float | None = _train("warmup_epochs")
    min_lr: float | None = _train("min_lr")
    scale_min: float | None = _train("scale_min", "random-resized-crop minimum area [mae: 0.2]")
    hflip: float | None = _train("hflip", "[mae recipe: 0.5; 0 for digits]")
    train_size: int | None = _train("train_size")
    val_size: int | None = _train("val_size")
    seed: int | None = _train("seed")
    threads: int | None = _train("threads")
    device: str | None = _train("device")
    force: bool = option(False, "--force", help="replace a non-empty output directory")
    quiet: bool = option(False, help="no progress bar or per-epoch lines")

    @field_validator("source")
    @classmethod
    def _explora_needs_a_source(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None and info.data.get("method") == "explora":
            raise ValueError("--method explora continues a pretrained encoder: give it with --from RUN")
        return v

    @field_validator(*EXPLORA_FIELDS)
    @classmethod
    def _explora_only(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("method") == "mae":
            raise ValueError("--unfreeze-blocks/--rank/--alpha/--lora are ExPLoRA options (--method explora)")
        if info.field_name == "unfreeze_blocks":
            _block_indices(v)
        return v

    @field_validator("levels")
    @classmethod
    def _hi_end_only(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            if info.data.get("method") != "hi-end-mae":
                raise ValueError("--levels is a Hi-End-MAE option (--method hi-end-mae)")
            _block_indices(v, "--levels", "9,6,3")
        return v

    @property
    def blocks(self) -> list[int] | None:
        """``--unfreeze-blocks`` as block indices."""
        return _block_indices(self.unfreeze_blocks)


def pretrain(o: PretrainOptions) -> None:
    """Self-supervised pretraining (MAE) or ExPLoRA stage 1; writes the encoder as a plain timm run."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(o.output, "dir", force=o.force)
    from vitkit.pretrain.presets import get_recipe, with_recipe
    from vitkit.train import build_config

    rec = get_recipe(o.recipe or ("hi-end-mae" if o.method == "hi-end-mae" else "mae"))
    fields = with_recipe(rec.pretrain, _loop_fields(o, PRETRAIN_TRAIN_FIELDS))
    cfg = build_config(**fields)
    mae = with_recipe(
        rec.mae,
        dict(
            mask_ratio=o.mask_ratio,
            decoder_dim=o.decoder_dim,
            decoder_depth=o.decoder_depth,
            decoder_heads=o.decoder_heads,
            norm_pix_loss=o.norm_pix_loss,
        ),
    )
    if o.levels is not None:
        mae["levels"] = _block_indices(o.levels, "--levels")
    if o.method != "explora":
        from vitkit.stages.pretrain import pretrain_mae

        run = pretrain_mae(
            cfg, o.output, mae=mae, source=o.source, method=o.method, force=o.force, quiet=o.quiet
        )
    else:
        from vitkit.stages.pretrain import explora_pretrain

        ex = dict(unfreeze_blocks=o.blocks, rank=o.rank, alpha=o.alpha, lora=o.lora)
        run = explora_pretrain(o.source, o.output, cfg, ex, mae=mae, force=o.force, quiet=o.quiet)
    m = run.metrics
    console.print(
        f"trainable parameters: {m['trainable_parameters']:,} of {m['parameters']:,} "
        f"(encoder {m['encoder_trainable_parameters']:,} of {m['encoder_parameters']:,})"
    )
    _print_run(
        f"{o.method} run",
        run.path,
        m,
        (
            "val_loss",
            "val_mean_baseline",
            "val_position_mean_baseline",
            "val_loss_ratio",
            "epochs",
            "train_seconds",
        ),
    )
    console.print(
        f"written: {run.path}/ (model.json + model.safetensors: the encoder; mae_decoder.safetensors; "
        "reconstructions.png). Next: vitkit finetune / vitkit evaluate --probe linear"
    )


# -- finetune ------------------------------------------------------------------------------------
FINETUNE_TRAIN_FIELDS = ("data", "task", "head", "hflip", "img_size", "epochs", "batch_size", "lr", "weight_decay", "layer_decay",
                         "drop_path", "randaug", "mixup", "cutmix", "label_smoothing", "warmup_epochs",
                         "scale_min", "translate", "train_size", "val_size", "seed", "threads",
                         "device")  # fmt: skip
PEFT_FIELDS = ("rank", "alpha", "targets", "num_prompts", "bottleneck", "group_size")


class FinetuneOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"config": "-c", "quiet": "-q"}

    run: Path = argument(help="pretrained run (MAE, ExPLoRA or supervised)")
    output: Path = option(..., "-o", "--output", help="new run directory")
    peft: str | None = option(
        None, help="lora | lora-qv | vpt-shallow | vpt-deep | dvpt | linear [default: full fine-tuning]"
    )
    labels_fraction: float = option(1.0, help="fraction of training labels used, in (0, 1]")
    recipe: str | None = option(None, help="mae | medical-mae | none [default: mae; none with --peft]")
    config: Path | None = option(None, help="YAML of TrainConfig fields")
    data: str | None = _train("data", "dataset URI [default: digits]")
    task: str | None = _train(
        "task", "what to learn [default: classification]; segmentation / change fine-tune under a dense head"
    )
    head: str | None = _train("head")
    img_size: int | None = _train("img_size", "a new size resamples the position embedding")
    rank: int | None = option(None, help="lora/lora-qv: rank [8]")
    alpha: float | None = option(None, help="lora/lora-qv: alpha [8]")
    targets: str | None = option(None, help="lora: roles, comma-separated from qkv,proj,fc1,fc2 [qkv]")
    num_prompts: int | None = option(None, help="vpt: prompts [5]; dvpt: prompt queries [10]")
    bottleneck: int | None = option(None, help="dvpt: bottleneck width [20]")
    group_size: int | None = option(None, help="dvpt: blocks sharing one module [0 = all]")
    epochs: int | None = _train("epochs")
    batch_size: int | None = _train("batch_size")
    lr: float | None = _train("lr")
    weight_decay: float | None = _train("weight_decay")
    layer_decay: float | None = _train("layer_decay", "layer-wise LR decay [mae recipe: 0.75]")
    drop_path: float | None = _train("drop_path")
    randaug: str | None = _train("randaug")
    mixup: float | None = _train("mixup")
    cutmix: float | None = _train("cutmix")
    label_smoothing: float | None = _train("label_smoothing")
    warmup_epochs: float | None = _train("warmup_epochs")
    scale_min: float | None = _train("scale_min")
    translate: float | None = _train("translate")
    hflip: float | None = _train("hflip")
    train_size: int | None = _train("train_size")
    val_size: int | None = _train("val_size")
    seed: int | None = _train("seed")
    threads: int | None = _train("threads")
    device: str | None = _train("device")
    force: bool = option(False, "--force", help="replace a non-empty output directory")
    quiet: bool = option(False, help="no progress bar or per-epoch lines")

    @field_validator(*PEFT_FIELDS)
    @classmethod
    def _needs_peft(cls, v: Any, info: ValidationInfo) -> Any:
        given = _targets(v) if info.field_name == "targets" else v
        if given is not None and "peft" in info.data and info.data["peft"] is None:
            raise ValueError(f"--{str(info.field_name).replace('_', '-')} need --peft")
        return v

    @property
    def peft_config(self) -> dict[str, Any]:
        """The PEFT method's options that were given (``--targets`` as a list of roles)."""
        cfg = {k: getattr(self, k) for k in PEFT_FIELDS} | {"targets": _targets(self.targets)}
        return {k: v for k, v in cfg.items() if v is not None}


def finetune(o: FinetuneOptions) -> None:
    """Fine-tune a pretrained run, fully (layer-wise LR decay) or parameter-efficiently."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(o.output, "dir", force=o.force)
    from vitkit.stages.finetune import finetune as finetune_api

    result = finetune_api(
        o.run,
        o.output,
        _loop_fields(o, FINETUNE_TRAIN_FIELDS),
        labels_fraction=o.labels_fraction,
        peft=o.peft,
        peft_config=o.peft_config,
        recipe=o.recipe,
        force=o.force,
        quiet=o.quiet,
    )
    m = result.metrics
    console.print(
        f"trainable parameters: {m['trainable_parameters']:,} of {m['parameters']:,} "
        f"({100 * m['trainable_parameters'] / m['parameters']:.2f}%)"
    )
    _print_run(
        "finetune run",
        result.path,
        m,
        ("top1", "balanced_accuracy", "mean_auroc", "mAP", "epochs", "train_seconds"),
    )


register_verb(Verb("pretrain", PretrainOptions, pretrain, panel="Adapt", produces=True))
register_verb(Verb("finetune", FinetuneOptions, finetune, panel="Adapt", input="run", produces=True))

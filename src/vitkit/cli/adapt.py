"""``vitkit pretrain`` (MAE, ExPLoRA stage 1) and ``vitkit finetune`` (full or parameter-efficient)."""

# ruff: noqa: UP045  (typing.Optional in typer signatures, as the CLI convention asks)

from pathlib import Path
from typing import Optional

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.errors import VitkitError
from vitkit.io import check_output
from vitkit.progress import console


def _ints(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise VitkitError(
            f"{flag}: expected comma-separated block indices such as -1 or 0,3; got '{text}'"
        ) from e


def _loop_fields(config: Optional[Path], **flags) -> dict:
    from vitkit.train.config import read_config_file

    fields = read_config_file(config) if config else {}
    fields.update({k: v for k, v in flags.items() if v is not None})
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


@app.command(rich_help_panel="Adapt")
def pretrain(
    output: Path = Opt(..., "-o", "--output", help="new run directory (the encoder, timm-loadable)"),
    method: str = Opt("mae", help="mae | explora (ExPLoRA stage 1: needs --from)"),
    source: Optional[Path] = Opt(None, "--from", help="continue from this run's encoder (and MAE decoder)"),
    recipe: str = Opt("mae", help="mae | medical-mae | none: MAE and crop settings; flags override"),
    config: Optional[Path] = Opt(None, "--config", "-c", help="YAML of TrainConfig fields"),
    model: Optional[str] = Opt(None, help="encoder: timm or vitkit ViT name [default: vitkit_micro_p4_16]"),
    data: Optional[str] = Opt(None, help="dataset URI; labels are ignored"),
    img_size: Optional[int] = Opt(None),
    in_chans: Optional[int] = Opt(None),
    mask_ratio: Optional[float] = Opt(None, help="fraction of patches hidden [mae: 0.75, medical: 0.9]"),
    decoder_dim: Optional[int] = Opt(None, help="decoder width [default: the encoder's, ≤ 512]"),
    decoder_depth: Optional[int] = Opt(None, help="decoder blocks [default: 2]"),
    decoder_heads: Optional[int] = Opt(None),
    norm_pix_loss: Optional[bool] = Opt(None, "--norm-pix-loss/--no-norm-pix-loss"),
    unfreeze_blocks: Optional[str] = Opt(None, help="explora: blocks trained in full, e.g. -1 or 0,-1"),
    rank: Optional[int] = Opt(None, help="explora: LoRA rank [8]"),
    alpha: Optional[float] = Opt(None, help="explora: LoRA alpha [8]"),
    lora: Optional[str] = Opt(None, help="explora: qv (ours, Q/V slices) | qkv (peft, fused qkv)"),
    epochs: Optional[int] = Opt(None),
    batch_size: Optional[int] = Opt(None),
    lr: Optional[float] = Opt(None),
    weight_decay: Optional[float] = Opt(None),
    warmup_epochs: Optional[float] = Opt(None),
    min_lr: Optional[float] = Opt(None),
    scale_min: Optional[float] = Opt(None, help="random-resized-crop minimum area [mae: 0.2]"),
    hflip: Optional[float] = Opt(None, help="[mae recipe: 0.5; 0 for digits]"),
    train_size: Optional[int] = Opt(None),
    val_size: Optional[int] = Opt(None),
    seed: Optional[int] = Opt(None),
    threads: Optional[int] = Opt(None),
    device: Optional[str] = Opt(None),
    force: bool = Opt(False, "--force", help="replace a non-empty output directory"),
    quiet: bool = Opt(False, "--quiet", "-q"),
) -> None:
    """Self-supervised pretraining (MAE) or ExPLoRA stage 1; writes the encoder as a plain timm run."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(output, "dir", force=force)
    from vitkit.pretrain.presets import get_recipe, with_recipe
    from vitkit.train import build_config

    if method not in ("mae", "explora"):
        raise VitkitError(f"--method must be mae or explora, got '{method}'")
    if method == "explora" and source is None:
        raise VitkitError("--method explora continues a pretrained encoder: give it with --from RUN")
    rec = get_recipe(recipe)
    fields = with_recipe(
        rec.pretrain,
        _loop_fields(
            config,
            model=model,
            data=data,
            img_size=img_size,
            in_chans=in_chans,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
            scale_min=scale_min,
            hflip=hflip,
            train_size=train_size,
            val_size=val_size,
            seed=seed,
            threads=threads,
            device=device,
        ),
    )
    cfg = build_config(**fields)
    mae = with_recipe(
        rec.mae,
        dict(
            mask_ratio=mask_ratio,
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            norm_pix_loss=norm_pix_loss,
        ),
    )
    if method == "mae":
        if any(v is not None for v in (unfreeze_blocks, rank, alpha, lora)):
            raise VitkitError(
                "--unfreeze-blocks/--rank/--alpha/--lora are ExPLoRA options (--method explora)"
            )
        from vitkit.stages.pretrain import pretrain_mae

        run = pretrain_mae(cfg, output, mae=mae, source=source, force=force, quiet=quiet)
    else:
        from vitkit.stages.pretrain import explora_pretrain

        ex = dict(
            unfreeze_blocks=_ints(unfreeze_blocks, "--unfreeze-blocks"), rank=rank, alpha=alpha, lora=lora
        )
        run = explora_pretrain(source, output, cfg, ex, mae=mae, force=force, quiet=quiet)
    m = run.metrics
    console.print(
        f"trainable parameters: {m['trainable_parameters']:,} of {m['parameters']:,} "
        f"(encoder {m['encoder_trainable_parameters']:,} of {m['encoder_parameters']:,})"
    )
    _print_run(
        f"{method} run",
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


@app.command(rich_help_panel="Adapt")
def finetune(
    run: Path = Arg(..., help="pretrained run (MAE, ExPLoRA or supervised)"),
    output: Path = Opt(..., "-o", "--output", help="new run directory"),
    peft: Optional[str] = Opt(
        None, help="lora | lora-qv | vpt-shallow | vpt-deep | dvpt | linear [default: full fine-tuning]"
    ),
    labels_fraction: float = Opt(1.0, help="fraction of training labels used, in (0, 1]"),
    recipe: Optional[str] = Opt(None, help="mae | medical-mae | none [default: mae; none with --peft]"),
    config: Optional[Path] = Opt(None, "--config", "-c", help="YAML of TrainConfig fields"),
    data: Optional[str] = Opt(None, help="dataset URI [default: digits]"),
    img_size: Optional[int] = Opt(None, help="a new size resamples the position embedding"),
    rank: Optional[int] = Opt(None, help="lora/lora-qv: rank [8]"),
    alpha: Optional[float] = Opt(None, help="lora/lora-qv: alpha [8]"),
    targets: Optional[str] = Opt(None, help="lora: roles, comma-separated from qkv,proj,fc1,fc2 [qkv]"),
    num_prompts: Optional[int] = Opt(None, help="vpt: prompts [5]; dvpt: prompt queries [10]"),
    bottleneck: Optional[int] = Opt(None, help="dvpt: bottleneck width [20]"),
    group_size: Optional[int] = Opt(None, help="dvpt: blocks sharing one module [0 = all]"),
    epochs: Optional[int] = Opt(None),
    batch_size: Optional[int] = Opt(None),
    lr: Optional[float] = Opt(None),
    weight_decay: Optional[float] = Opt(None),
    layer_decay: Optional[float] = Opt(None, help="layer-wise LR decay [mae recipe: 0.75]"),
    drop_path: Optional[float] = Opt(None),
    randaug: Optional[str] = Opt(None),
    mixup: Optional[float] = Opt(None),
    cutmix: Optional[float] = Opt(None),
    label_smoothing: Optional[float] = Opt(None),
    warmup_epochs: Optional[float] = Opt(None),
    scale_min: Optional[float] = Opt(None),
    translate: Optional[float] = Opt(None),
    train_size: Optional[int] = Opt(None),
    val_size: Optional[int] = Opt(None),
    seed: Optional[int] = Opt(None),
    threads: Optional[int] = Opt(None),
    device: Optional[str] = Opt(None),
    force: bool = Opt(False, "--force"),
    quiet: bool = Opt(False, "--quiet", "-q"),
) -> None:
    """Fine-tune a pretrained run, fully (layer-wise LR decay) or parameter-efficiently."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(output, "dir", force=force)
    from vitkit.stages.finetune import finetune as finetune_api

    peft_cfg = {
        "rank": rank,
        "alpha": alpha,
        "targets": [t for t in targets.replace(" ", "").split(",") if t] if targets else None,
        "num_prompts": num_prompts,
        "bottleneck": bottleneck,
        "group_size": group_size,
    }
    peft_cfg = {k: v for k, v in peft_cfg.items() if v is not None}
    if peft_cfg and peft is None:
        raise VitkitError(f"{', '.join('--' + k.replace('_', '-') for k in peft_cfg)} need --peft")
    fields = _loop_fields(
        config,
        data=data,
        img_size=img_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        drop_path=drop_path,
        randaug=randaug,
        mixup=mixup,
        cutmix=cutmix,
        label_smoothing=label_smoothing,
        warmup_epochs=warmup_epochs,
        scale_min=scale_min,
        translate=translate,
        train_size=train_size,
        val_size=val_size,
        seed=seed,
        threads=threads,
        device=device,
    )
    result = finetune_api(
        run,
        output,
        fields,
        labels_fraction=labels_fraction,
        peft=peft,
        peft_config=peft_cfg,
        recipe=recipe,
        force=force,
        quiet=quiet,
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

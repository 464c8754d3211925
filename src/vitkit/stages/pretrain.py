"""Self-supervised pretraining as a run: MAE in the one loop, the encoder written as a plain timm run.

``pretrain_mae`` builds (or loads) an encoder, wraps it in :class:`MaskedAutoencoder`, trains it with
:class:`MAEObjective` through :func:`vitkit.train.fit`, and writes a run directory whose
``model.safetensors`` is the *encoder alone* in timm's fine-tuning layout (``num_classes=0``, the
source's pooling; ``global_pool='avg'`` + ``fc_norm`` for encoders built here). So
``vitkit.load(run)`` is a plain timm ViT, ``vitkit finetune run`` builds a classifier from it and
``vitkit evaluate run --probe linear`` probes it. The decoder goes to ``mae_decoder.safetensors``
so pretraining can continue (ExPLoRA).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitkit.adapt.explora import ExploraConfig, apply_explora
from vitkit.adapt.lora import merge_lora
from vitkit.data import DataSplits, seed_everything
from vitkit.errors import VitkitError
from vitkit.io import atomic_path, write_atomic, write_yaml
from vitkit.models import create_model, get_manifest, model_input_size
from vitkit.pretrain import METHOD_CONFIGS
from vitkit.pretrain.mae import MAEConfig, MAEObjective, MaskedAutoencoder
from vitkit.progress import console
from vitkit.registry import parse_config
from vitkit.runs import CONFIG, Run, new_run_dir, save_model, write_metrics
from vitkit.stages.common import data_splits_for
from vitkit.train import TrainConfig, build_config, fit
from vitkit.train.evaluate import eval_transform

DECODER = "mae_decoder.safetensors"


@dataclass
class PretrainedRun:
    path: Path
    encoder: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def new_encoder(cfg: TrainConfig) -> nn.Module:
    """A fresh encoder in timm's fine-tuning layout: no head, global average pool, ``fc_norm``."""
    kwargs: dict[str, Any] = {"global_pool": "avg", "fc_norm": True, **cfg.model_kwargs}
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    return create_model(cfg.model, num_classes=0, img_size=cfg.img_size, in_chans=cfg.in_chans, **kwargs)


def load_source_encoder(source: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """A plain run's model as the encoder to keep pretraining; its decoder state when it has one."""
    run = Run.open(source)
    info = run.info
    if info.manifest.transforms:
        names = ", ".join(t.name for t in info.manifest.transforms)
        raise VitkitError(
            f"--from {source}: pretraining continues from a plain encoder, but the run carries transforms "
            f"({names}); merge or drop them first"
        )
    encoder = run.model()
    decoder: dict[str, Any] = {}
    dec_path = Path(source) / DECODER
    if dec_path.is_file():
        try:
            decoder = {"state": load_file(str(dec_path)), "mae": info.extra.get("pretrain", {}).get("mae")}
        except (SafetensorError, OSError) as e:
            raise VitkitError(f"{dec_path} is truncated or not a safetensors file ({e})") from e
    return encoder, decoder


def export_encoder(encoder: nn.Module) -> nn.Module:
    """Drop the head (``num_classes=0``) and make every parameter trainable again."""
    if getattr(encoder, "num_classes", 0) and hasattr(encoder, "reset_classifier"):
        encoder.reset_classifier(0)
    manifest = get_manifest(encoder)
    if manifest is not None:
        manifest.kwargs["num_classes"] = 0
    for p in encoder.parameters():
        p.requires_grad_(True)
    return encoder


def pretrain_mae(
    train: TrainConfig | dict[str, Any],
    output: str | os.PathLike,
    *,
    mae: MAEConfig | dict[str, Any] | None = None,
    source: str | os.PathLike | None = None,
    encoder_transform: Callable[[nn.Module], nn.Module] | None = None,
    finalize: Callable[[nn.Module], nn.Module] | None = None,
    data: DataSplits | None = None,
    method: str = "mae",
    extra: dict[str, Any] | None = None,
    force: bool = False,
    quiet: bool = False,
) -> PretrainedRun:
    """MAE pretraining into the run directory ``output``.

    Args:
        train: loop settings (``model`` names the encoder when there is no ``source``).
        mae: :class:`MAEConfig` (mask ratio, decoder, ``norm_pix_loss``); for ``method``
            ``hi-end-mae`` a :class:`~vitkit.pretrain.hiend.HiEndMAEConfig` (its decoder reads
            intermediate encoder layers too).
        source: a plain run to continue from (its encoder, and its MAE decoder when it has one and
            the decoder settings match); otherwise a fresh encoder with MAE's initialisation.
        encoder_transform: applied to the encoder before training (e.g. ExPLoRA's freezing + LoRA).
        finalize: applied to the trained encoder before it is written (e.g. merging LoRA).
        data: splits to use instead of ``train.data`` (labels are ignored).
    """
    cfg = train if isinstance(train, TrainConfig) else build_config(**train)
    if method not in METHOD_CONFIGS and method != "explora":
        raise VitkitError(
            f"unknown pretraining method '{method}' (expected one of: {', '.join(METHOD_CONFIGS)})"
        )
    config_cls = METHOD_CONFIGS.get(method, MAEConfig)
    mae_cfg = mae if isinstance(mae, MAEConfig) else config_cls.build(**(mae or {}))
    if type(mae_cfg) is not config_cls:
        raise VitkitError(
            f"{method}: its settings are a {config_cls.__name__}, got a {type(mae_cfg).__name__} (pass a dict "
            "or the method's own settings class)"
        )
    if cfg.mixup or cfg.cutmix:
        raise VitkitError("mixup/cutmix mix labels; MAE pretraining uses none (set them to 0)")
    # Undone if the command fails before the run has a checkpoint (see new_run_dir).
    with new_run_dir(output, force=force) as out:
        seed_everything(cfg.seed)

        decoder: dict[str, Any] = {}
        if source is not None:
            encoder, decoder = load_source_encoder(source)
            manifest = get_manifest(encoder)
            assert manifest is not None
            cfg = cfg.model_copy(
                update={
                    "model": manifest.name,
                    "img_size": model_input_size(encoder)[1],
                    "pretrained_file": None,
                }
            )
        else:
            encoder = new_encoder(cfg)
        if data is None:
            data = data_splits_for(cfg, model_input_size(encoder)[1])
        if source is None:  # a source run fixes the input size: no --img-size to suggest
            _note_downscaling(data, model_input_size(encoder)[1:], quiet)
        seed_everything(cfg.seed)
        model = mae_cfg.build_model(encoder, init_encoder=source is None)
        reused_decoder = _maybe_load_decoder(model, decoder, mae_cfg)
        if decoder and not reused_decoder and not quiet:
            console.print(
                f"{method}: {source} has a decoder of other settings or another method; a fresh one is trained"
            )
        if encoder_transform is not None:
            encoder_transform(encoder)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        enc_total = sum(p.numel() for p in encoder.parameters())
        enc_trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        if not quiet:
            console.print(
                f"{method}: trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
                f"encoder {enc_trainable:,} of {enc_total:,} ({100 * enc_trainable / enc_total:.2f}%)"
            )
        write_yaml(out / CONFIG, cfg.model_dump(mode="json"))
        result = fit(model, data, cfg, objective=MAEObjective(), run_dir=out, quiet=quiet)

        trained: MaskedAutoencoder = result.model
        enc = trained.encoder
        if finalize is not None:
            enc = finalize(enc)
        enc = export_encoder(enc)
        pretrain_info = {
            "method": method,
            "mae": _resolved_settings(trained, mae_cfg),
            "source": str(source) if source is not None else None,
            "decoder_reused": reused_decoder,
            **(extra or {}),
        }
        save_model(
            out, enc, classes=[], task="none", data=data.description, extra={"pretrain": pretrain_info}
        )
        _save_decoder(out / DECODER, trained)
        metrics = {
            **{k: v for k, v in result.val_metrics.items()},
            "method": method,
            "parameters": total,
            "trainable_parameters": trainable,
            "encoder_parameters": enc_total,
            "encoder_trainable_parameters": enc_trainable,
            "epochs": result.epochs_completed,
            "train_seconds": round(result.train_seconds, 3),
            "precision": result.precision,
            "data_description": data.description,
            "pretrain": pretrain_info,
        }
        write_metrics(out, metrics)
        _save_reconstructions(out / "reconstructions.png", trained, data, quiet)
        return PretrainedRun(out, enc, metrics, result.history)


def _note_downscaling(data: DataSplits, size: tuple[int, int], quiet: bool) -> None:
    """Say so when the images are shrunk to at most half their side to fit the encoder (a 16 px preset
    on 64 px canvases keeps little of them); --img-size builds the encoder at their size instead."""
    h, w = data.train.images.shape[-2:]
    if not quiet and (h >= 2 * size[0] or w >= 2 * size[1]):
        console.print(
            f"pretrain: the {h}x{w} training images are resized to the encoder's {size[0]}x{size[1]} input; "
            f"--img-size {max(h, w)} builds the encoder at their size"
        )


def _maybe_load_decoder(model: MaskedAutoencoder, decoder: dict[str, Any], cfg: MAEConfig) -> bool:
    if not decoder:
        return False
    saved = decoder.get("mae") or {}
    own_settings = _resolved_settings(model, cfg)
    keys = ("decoder_dim", "decoder_depth", "decoder_heads", "levels")
    same = all(saved.get(k) == own_settings.get(k) for k in keys)
    state = decoder["state"]
    own = model.decoder_state_dict()
    if not same or set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        return False
    model.load_state_dict({**model.state_dict(), **state})
    return True


def _resolved_settings(model: MaskedAutoencoder, cfg: MAEConfig) -> dict[str, Any]:
    """The settings as recorded: Hi-End-MAE's ``levels`` as the blocks actually tapped."""
    settings = cfg.model_dump()
    levels = getattr(model, "levels", None)
    if levels is not None:
        settings["levels"] = list(levels)
    return settings


def _save_decoder(path: Path, model: MaskedAutoencoder) -> None:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.decoder_state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


@torch.no_grad()
def _save_reconstructions(
    path: Path, model: MaskedAutoencoder, data: DataSplits, quiet: bool, n: int = 8
) -> None:
    """A picture a person can check: validation images, what the encoder saw, the reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf = eval_transform(model.encoder)
    model.eval()
    x = tf.images(data.val.images[:n]).to(next(model.parameters()).device)
    _, pred, mask = model(x, generator=torch.Generator().manual_seed(0))
    recon = model.reconstruct(x, pred)
    ph, pw = model.patch_size
    up = mask.reshape(-1, *model.grid).repeat_interleave(ph, 1).repeat_interleave(pw, 2).unsqueeze(1)
    visible = x * (1 - up)
    pasted = x * (1 - up) + recon * up
    mean, std = tf.mean.to(x.device), tf.std.to(x.device)
    rows = [(x * std + mean), (visible * std + mean), (pasted * std + mean)]
    fig, axes = plt.subplots(3, len(x), figsize=(1.2 * len(x), 3.8), squeeze=False)
    for r, (title, imgs) in enumerate(zip(("image", "visible", "reconstruction"), rows)):
        for c in range(len(x)):
            img = imgs[c].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            ax = axes[r][c]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def explora_pretrain(
    source: str | os.PathLike,
    output: str | os.PathLike,
    train: Any,
    cfg: ExploraConfig | dict[str, Any] | None = None,
    *,
    mae: Any = None,
    data: Any = None,
    force: bool = False,
    quiet: bool = False,
):
    """Stage 1: continue MAE on the target data from ``source``; write the merged encoder as a run."""
    cfg = parse_config(ExploraConfig, cfg, "explora")
    return pretrain_mae(
        train,
        output,
        mae=mae,
        source=source,
        encoder_transform=lambda enc: apply_explora(enc, cfg),
        finalize=merge_lora,
        data=data,
        method="explora",
        extra={"explora": cfg.model_dump()},
        force=force,
        quiet=quiet,
    )

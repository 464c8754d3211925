"""Progressive re-tokenization — Chen et al., "Auto-scaling Vision Transformers without Training"
(As-ViT, ICLR 2022), section "efficient training": ViTs tolerate coarse tokens early in training, so
the first part of training runs on fewer, coarser tokens and the rest on the model's own.

As-ViT's training code (TensorFlow, TPU) was never released (VITA-Group/AsViT's README: "to be
released soon"), so this is **our reading**: during the first ``until`` fraction of the epochs the
patch embedding's convolution runs with its stride multiplied by ``stride`` (the same kernel sampled
on a sparser grid: ``stride``² times fewer tokens, the position embedding resampled to that grid by
timm's dynamic-size path), then with its own stride to the end. The model's weights and structure
are the same in both phases, so the trained model is a plain ViT at its own tokenization; the
transform is recorded in the manifest (replaying it only turns on timm's dynamic-size path, which
at the model's own size computes the same function).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import record_transform
from vitkit.registry import AS_IS, Technique, TrainTransform, parse_config, register
from vitkit.train.callbacks import Callback, TrainContext


class RetokenizeConfig(BaseModel):
    """``vitkit train --transform retokenize:stride=2,until=0.5``"""

    model_config = ConfigDict(extra="forbid")

    stride: int = Field(2, ge=2, le=8, description="coarse phase: the patch stride times this")
    until: float = Field(0.5, gt=0, lt=1, description="fraction of the epochs trained on coarse tokens")


def _patch_conv(model: nn.Module) -> nn.Conv2d:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d) or not hasattr(model, "dynamic_img_size"):
        raise VitkitError("retokenize: needs a timm VisionTransformer with a convolutional patch embedding")
    return proj


def enable_dynamic_size(model: nn.Module) -> None:
    """timm's dynamic-size path on an existing ViT: the settings ``VisionTransformer(dynamic_img_size=
    True)`` gives its patch embedding (NHWC output, no strict size), so the position embedding is
    resampled to whatever grid the patch embedding produces."""
    from timm.layers import Format

    pe = model.patch_embed
    model.dynamic_img_size = True
    pe.strict_img_size = False
    pe.flatten = False
    pe.output_fmt = Format.NHWC


def set_token_stride(model: nn.Module, factor: int) -> None:
    """The patch convolution's stride: its kernel size times ``factor`` (1: the model's own)."""
    proj = _patch_conv(model)
    k = proj.kernel_size
    proj.stride = (k[0] * factor, k[1] * factor)


def apply_retokenize(model: nn.Module, cfg: RetokenizeConfig | dict | None = None) -> nn.Module:
    cfg = RetokenizeConfig(**cfg) if isinstance(cfg, dict) else (cfg or RetokenizeConfig())
    proj = _patch_conv(model)
    if tuple(proj.stride) != tuple(proj.kernel_size):
        raise VitkitError("retokenize: the patch embedding already has a stride other than its patch size")
    enable_dynamic_size(model)
    record_transform(model, "retokenize", cfg.model_dump())
    return model


def replay_retokenize(model: nn.Module, config: dict) -> nn.Module:
    return apply_retokenize(model, RetokenizeConfig(**config))


class CoarseTokens(Callback):
    """Coarse tokens (stride x ``cfg.stride``) in the first ``until`` of the epochs, the model's own
    after; set at every epoch start, so a resumed run is in the right phase."""

    def __init__(self, cfg: RetokenizeConfig):
        self.cfg = cfg

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        coarse = epoch < round(self.cfg.until * ctx.cfg.epochs)
        set_token_stride(ctx.model, self.cfg.stride if coarse else 1)

    def on_train_end(self, ctx: TrainContext) -> None:
        set_token_stride(ctx.model, 1)


def train_transform(options: dict[str, str]) -> TrainTransform:
    cfg = parse_config(RetokenizeConfig, options, "retokenize")

    def finalize(model: nn.Module) -> nn.Module:
        set_token_stride(model, 1)
        return model

    return TrainTransform(
        apply=lambda model: apply_retokenize(model, cfg),
        callbacks=lambda: [CoarseTokens(cfg)],
        finalize=finalize,
    )


register(
    Technique(
        name="retokenize",
        summary="train the first part of the epochs on coarse tokens (patch stride x k), the rest on the model's own",
        paper='Chen et al., "Auto-scaling Vision Transformers without Training" (2022)',
        config=RetokenizeConfig,
        replay=replay_retokenize,
        export=AS_IS,
        train=train_transform,
        family="architecture",
        verb="vitkit train --transform retokenize:stride=2,until=0.5",
    )
)

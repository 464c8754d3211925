"""ViTamin for small images: MbConv stages, then a plain ViT, as timm-registered models.

Paper: Chen, Yu, Shen, Yuille & Chen, "ViTamin: Designing Scalable Vision Models in the
Vision-Language Era" (CVPR 2024); built by timm's own port (``timm/models/vitamin.py``, timm 1.0.31),
not a re-implementation: timm's ``VisionTransformer`` whose patch embedding is a ``HybridEmbed``
(``proj=False``, patch 1) over timm's ``MbConvStages``, configured through timm's ``VitCfg`` /
``VitConvCfg`` and its ``GeGluMlp``, exactly as ``_create_vitamin`` assembles ``vitamin_small_224``.
Per model, in order:

1. stem: 3x3 conv, LayerNorm2d + GELU, 3x3 conv (``stem_width`` channels);
2. stage 1 and stage 2: pre-norm MbConv blocks (LayerNorm2d, 1x1 expand x4, GELU, 3x3 depthwise,
   GELU, 1x1), the first block of each stage strided with an average-pool + 1x1 shortcut;
3. a LayerNorm2d + strided 3x3 conv to the ViT width (the "patch" step: its pixels are tokens);
4. the transformer stage: a learned position embedding, pre-norm blocks of multi-head attention
   (timm's ``Attention``, so vitkit swaps in ``VitkitAttention``) and timm's ``GeGluMlp`` (ratio 2,
   with its own LayerNorm), no class token, the mean of the tokens, ``fc_norm``, linear head.

Simplified against the paper, on purpose, for 16-32 px inputs trained from scratch:

- **4x downsampling, not 16x.** The paper strides by 2 in the stem, in the first block of each MbConv
  stage and in the final conv (stage 3 at 1/16: 14x14 tokens at 224 px); at 16 px that leaves one
  token. Here the stem and stage 1 keep stride 1 (the first two of the four stride-2 steps dropped, as
  CIFAR ResNets drop the stem's), stage 2 and the final conv keep stride 2: the transformer sees 4x4
  tokens at 16 px and 8x8 at 32 px, the grids of vitkit's patch-4 presets. timm's ``MbConvStages``
  hard-codes its strides, so :class:`SmallMbConvStages` builds timm's module and then sets the strides
  of the stride-2 steps it drops to 1 (the conv's stride, and the average pool of that block's
  shortcut becomes an identity); the forward is timm's, the parameter names and shapes are timm's
  (a ``vitamin_*`` state dict of the same widths loads strictly).
- **Sizes** (table): the paper's ViTamin-S is 64/128 conv widths, 2/4 MbConv blocks, a 384-wide,
  14-block ViT (22M parameters); these keep the layout (two conv stages, the second twice as wide:
  1/6 and 1/3 of the ViT width for tiny, as in ViTamin-S, 1/4 and 1/2 for the narrower nano and
  micro; 2 + 4 MbConv blocks but in nano) at the parameter budgets of the plain vitkit presets, with
  3-4 transformer blocks instead of 14.
- **Training**: image classification from scratch; no CLIP training on DataComp-1B, no text tower,
  no locked-text tuning, no pretrained weights. Normalization mean = std = 0.5 (vitkit's presets),
  not OpenAI CLIP's.
- timm's ``MbConvStages`` reads only ``stem_width``, ``embed_dim`` and ``depths`` of ``VitCfg``; its
  ``conv_cfg`` (``VitConvCfg``) is recorded as timm's presets set it, but the blocks use their own
  defaults (LayerNorm2d eps 1e-6, GELU, expansion 4, 3x3), which timm's ``vitamin_*`` models use too.

| name                     | img | stem | conv widths | MbConv | dim | depth | heads | tokens | params (10 cls) | plain ViT match              |
|--------------------------|-----|------|-------------|--------|-----|-------|-------|--------|-----------------|------------------------------|
| vitkit_vitamin_nano_16   | 16  | 8    | 8, 16       | 1, 1   | 32  | 2     | 2     | 4x4    | 31k (tests)     | vitkit_nano_p4_16 (20k)      |
| vitkit_vitamin_micro_16  | 16  | 16   | 16, 32      | 2, 4   | 64  | 3     | 4     | 4x4    | 0.19M           | vitkit_micro_p4_16 (0.21M)   |
| vitkit_vitamin_tiny_32   | 32  | 32   | 32, 64      | 2, 4   | 192 | 4     | 3     | 8x8    | 1.78M           | vitkit_tiny_p4_32 (1.81M)    |

``img_size`` and ``in_chans`` overrides work as for the presets (the grid is ``img_size / 4``);
``embed_dim`` also sets the width of the final conv (``HybridEmbed`` has no projection); ``patch_size``
must stay 1.

This module imports nothing of vitkit but :mod:`vitkit.errors` and ``models.pretrained_cfg``:
``vitkit.models`` imports it to register the models.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.models.vitamin import Downsample2d, GeGluMlp, MbConvStages, VitCfg, VitConvCfg
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models.pretrained_cfg import small_input_cfg

__all__ = ["PAPER_STRIDES", "SMALL_STRIDES", "SmallMbConvStages", "vitamin_cfg"]

PAPER_STRIDES = (2, 2, 2, 2)  # stem, stage 1, stage 2, final conv: 16x (timm's MbConvStages)
SMALL_STRIDES = (1, 1, 2, 2)  # 4x: 4x4 tokens at 16 px, 8x8 at 32 px


class SmallMbConvStages(MbConvStages):
    """timm's ViTamin ``MbConvStages`` with a stride (1 or 2) for each of its four stride-2 steps:
    the stem's first conv, the first MbConv block of stage 1 and of stage 2, and the final strided
    conv. Built by timm, then the steps at stride 1 are un-strided in place (the forward is timm's)."""

    def __init__(
        self,
        cfg: VitCfg,
        in_chans: int = 3,
        strides: tuple[int, int, int, int] = SMALL_STRIDES,
        **dd: Any,
    ):
        super().__init__(cfg, in_chans=in_chans, **dd)
        strides = tuple(int(s) for s in strides)
        if len(strides) != 4 or any(s not in (1, 2) for s in strides):
            raise VitkitError(f"ViTamin conv strides must be four values of 1 or 2, got {strides}")
        self.strides = strides
        stem, stage1, stage2, final = strides
        if stem == 1:
            self.stem.conv1.stride = (1, 1)
        for stage, stride in zip(self.stages, (stage1, stage2)):
            if stride == 1:
                block = stage[0]
                block.stride = 1
                block.conv2_kxk.stride = (1, 1)
                if isinstance(block.shortcut, Downsample2d):
                    block.shortcut.pool = nn.Identity()  # keeps the 1x1 ``expand`` (timm's names)
        if final == 1:
            self.pool.proj.stride = (1, 1)

    @property
    def reduction(self) -> int:
        """The total downsampling factor (4 for the vitkit presets, 16 for the paper's)."""
        r = 1
        for s in self.strides:
            r *= s
        return r


def vitamin_cfg(
    stem_width: int, conv_dims: tuple[int, int], conv_depths: tuple[int, int], dim: int
) -> VitCfg:
    """timm's ``VitCfg`` for the conv stages, set as timm's ``vitamin_*`` presets set it."""
    return VitCfg(
        embed_dim=(*conv_dims, dim),
        depths=(*conv_depths, 1),
        stem_width=stem_width,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
        head_type="1d",
    )


def _cfg(img: int) -> dict[str, Any]:
    return small_input_cfg(img, first_conv="patch_embed.backbone.stem.conv1")


default_cfgs = generate_default_cfgs(
    {
        "vitkit_vitamin_nano_16": _cfg(16),
        "vitkit_vitamin_micro_16": _cfg(16),
        "vitkit_vitamin_tiny_32": _cfg(32),
    }
)

# conv stages (stem width, stage widths, stage depths), then the transformer stage (timm kwargs)
_CONV = {
    "nano": (8, (8, 16), (1, 1)),
    "micro": (16, (16, 32), (2, 4)),
    "tiny": (32, (32, 64), (2, 4)),
}
_VIT = {
    "nano": dict(img_size=16, embed_dim=32, depth=2, num_heads=2),
    "micro": dict(img_size=16, embed_dim=64, depth=3, num_heads=4),
    "tiny": dict(img_size=32, embed_dim=192, depth=4, num_heads=3),
}


def _build(variant: str, arch: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    """timm's ``_create_vitamin`` with :class:`SmallMbConvStages` in place of ``MbConvStages``."""
    args: dict[str, Any] = {
        **_VIT[arch],
        "mlp_layer": GeGluMlp,
        "mlp_ratio": 2.0,
        "class_token": False,
        "global_pool": "avg",
        "num_classes": 10,
        **kwargs,
    }
    patch = args.pop("patch_size", 1)
    if patch not in (1, (1, 1), [1, 1]):
        raise VitkitError(
            f"{variant}: ViTamin's tokens are the pixels of its conv stages (4x downsampling); patch_size "
            f"must be 1, got {patch}"
        )
    stem_width, conv_dims, conv_depths = _CONV[arch]
    dd = {k: args[k] for k in ("device", "dtype") if k in args}  # older timm takes neither
    backbone = SmallMbConvStages(
        vitamin_cfg(stem_width, conv_dims, conv_depths, args["embed_dim"]),
        in_chans=args.get("in_chans", 3),
        **dd,
    )
    args["embed_layer"] = partial(HybridEmbed, backbone=backbone, proj=False)
    out_indices = args.pop("out_indices", args["depth"] - 1)
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        patch_size=1,
        **args,
    )


@register_model
def vitkit_vitamin_nano_16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViTamin for unit tests: 1 + 1 MbConv blocks, a 2-block 32-wide ViT on 4x4 tokens (16x16 input)."""
    return _build("vitkit_vitamin_nano_16", "nano", pretrained, **kwargs)


@register_model
def vitkit_vitamin_micro_16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViTamin for 16x16 inputs: 2 + 4 MbConv blocks, a 3-block 64-wide ViT on 4x4 tokens; the match
    of vitkit_micro_p4_16 in parameters."""
    return _build("vitkit_vitamin_micro_16", "micro", pretrained, **kwargs)


@register_model
def vitkit_vitamin_tiny_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViTamin for 32x32 inputs: 2 + 4 MbConv blocks, a 4-block 192-wide ViT on 8x8 tokens; the match
    of vitkit_tiny_p4_32 in parameters."""
    return _build("vitkit_vitamin_tiny_32", "tiny", pretrained, **kwargs)

"""vitkit's small-input ViT presets, registered into timm's registry (``timm.create_model`` sees them).

Names say the geometry: ``vitkit_<size>_p<patch>_<img>``. They exist so that training from scratch
on small images (8x8 digits upsampled, 28x28 Fashion-MNIST padded) runs in seconds on a CPU.

| name                            | img | patch | dim | depth | heads | mlp | params (10 cls) |
|---------------------------------|-----|-------|-----|-------|-------|-----|-----------------|
| vitkit_nano_p4_16               | 16  | 4     | 32  | 2     | 2     | 2   | ~19k            |
| vitkit_micro_p4_16              | 16  | 4     | 64  | 4     | 4     | 4   | ~0.2M           |
| vitkit_tiny_p4_32               | 32  | 4     | 192 | 6     | 3     | 2   | ~1.8M           |
| vitkit_small_p4_32              | 32  | 4     | 384 | 6     | 6     | 4   | ~10.7M          |
| vitkit_micro_distilled_p4_16    | as micro, with a DeiT distillation token and head       |
| vitkit_tiny_distilled_p4_32     | as tiny, with a DeiT distillation token and head        |
"""

from __future__ import annotations

from functools import partial

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from vitkit.models.pretrained_cfg import small_input_cfg

__all__: list[str] = []

_cfg = small_input_cfg


default_cfgs = generate_default_cfgs(
    {
        "vitkit_nano_p4_16": _cfg(16),
        "vitkit_micro_p4_16": _cfg(16),
        "vitkit_tiny_p4_32": _cfg(32),
        "vitkit_small_p4_32": _cfg(32),
        "vitkit_micro_distilled_p4_16": _cfg(16, classifier=("head", "head_dist")),
        "vitkit_tiny_distilled_p4_32": _cfg(32, classifier=("head", "head_dist")),
    }
)

_ARCHS = {
    "nano": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "micro": dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0),
    "tiny": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0),
    "small": dict(img_size=32, patch_size=4, embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0),
}


def _build(variant: str, arch: str, distilled: bool, pretrained: bool, **kwargs):
    args = {**_ARCHS[arch], "num_classes": 10, **kwargs}
    if distilled:
        args.setdefault("class_token", True)
    return build_model_with_cfg(
        VisionTransformerDistilled if distilled else VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True)
        if distilled
        else checkpoint_filter_fn,
        feature_cfg=dict(out_indices=args["depth"] - 1, feature_cls="getter"),
        **args,
    )


@register_model
def vitkit_nano_p4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """2-block, 32-wide ViT for unit tests (16x16 input, patch 4)."""
    return _build("vitkit_nano_p4_16", "nano", False, pretrained, **kwargs)


@register_model
def vitkit_micro_p4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """4-block, 64-wide ViT for 16x16 inputs (the demo model)."""
    return _build("vitkit_micro_p4_16", "micro", False, pretrained, **kwargs)


@register_model
def vitkit_tiny_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """6-block, 192-wide ViT-Tiny-like model for 32x32 inputs."""
    return _build("vitkit_tiny_p4_32", "tiny", False, pretrained, **kwargs)


@register_model
def vitkit_small_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """6-block, 384-wide ViT for 32x32 inputs (a teacher for feature distillation)."""
    return _build("vitkit_small_p4_32", "small", False, pretrained, **kwargs)


@register_model
def vitkit_micro_distilled_p4_16(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    """The micro preset with a DeiT distillation token and head."""
    return _build("vitkit_micro_distilled_p4_16", "micro", True, pretrained, **kwargs)


@register_model
def vitkit_tiny_distilled_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    """The tiny preset with a DeiT distillation token and head."""
    return _build("vitkit_tiny_distilled_p4_32", "tiny", True, pretrained, **kwargs)


# Model families registered into timm's registry alongside the presets (models/dhvt.py imports nothing
# of vitkit but vitkit.errors, so no cycle): the DHVT family of issue 9.
from vitkit.models import dhvt as _dhvt  # noqa: E402, F401
from vitkit.models import dualtoken as _dualtoken  # noqa: E402, F401  (DualToken-ViT, issue 23 part 2)
from vitkit.models import hyena as _hyena  # noqa: E402, F401  (Hyena N-D, issue 23)
from vitkit.models import tic as _tic  # noqa: E402, F401  (TiC / MSA-Conv, issue 23 part 1)
from vitkit.models import vitamin as _vitamin  # noqa: E402, F401  (ViTamin, small-image presets)

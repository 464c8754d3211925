"""DHVT: ViTs with convolutional inductive biases for small datasets, as timm-registered models.

Paper: Lu et al., "Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on
Small Datasets" (NeurIPS 2022); code: ArieSeirack/DHVT (``vision_transformer.py``).

What it changes in a ViT (built as timm's ``VisionTransformer`` through its own extension points:
``embed_layer``, ``attn_layer``, ``mlp_layer``; no fork of timm's classes):

* **SOPE** (sequential overlapping patch embedding): log2(patch) ``Conv3x3/2 + BN (+ GELU between)``
  from timm's ``ConvNormAct``, wrapped in per-channel affine layers (α=1, β=0); **no absolute
  position embedding**.
* **DAFF** (dynamic aggregation feed-forward): the MLP on the patch grid as ``1x1 conv+BN+GELU ->
  x + (DW3x3+BN+GELU)(x) -> 1x1 conv+BN``; the CLS token is not transformed but rescaled channel-wise
  by ``Linear(C/4->C)(GELU(Linear(C->C/4)(GAP(patch output))))`` (no sigmoid, as in the code).
* **HI-MHSA** (head-interaction attention): per head h, the mean of all tokens' head-h slice ->
  ``Linear(d/H->d)``, ``LayerNorm(d/H)`` per head chunk, GELU, + a learnable head position -> H
  extra "head tokens"; standard attention over N+H tokens (timm's ``Attention``, which
  ``vitkit.create_model`` swaps for ``VitkitAttention``, so every vitkit hook works inside); then
  ``cls += mean(head tokens)`` and the head tokens are dropped.

Differences from the code (also in docs/smalldata.md): SyncBatchNorm -> BatchNorm2d (CPU, one
process); SOPE takes ``in_chans`` (the code hard-codes 3) and also patch 8 (the code: 2, 4, 16); the
DAFF convolutions keep their biases (as in the code, although BN follows). DHVT has exactly one
prefix token (CLS) and needs a square patch grid; other layouts raise :class:`VitkitError`.

Ablations: every builder takes ``sope=False`` (timm ``PatchEmbed`` + learned position embedding),
``daff=False`` (timm ``Mlp``), ``head_tokens=False`` (plain multi-head attention).

| name                        | img | patch | dim | depth | heads | mlp | params (10 cls) |
|-----------------------------|-----|-------|-----|-------|-------|-----|-----------------|
| vitkit_dhvt_nano_p4_16      | 16  | 4     | 32  | 2     | 2     | 2   | ~26k (tests)    |
| vitkit_dhvt_micro_p4_16     | 16  | 4     | 64  | 4     | 4     | 3   | ~213k (≈ vitkit_micro_p4_16's 205k) |
| vitkit_dhvt_tiny_p4_32      | 32  | 4     | 192 | 12    | 4     | 4   | paper's DHVT-T (CIFAR) |
| vitkit_dhvt_small_p4_32     | 32  | 4     | 384 | 12    | 8     | 4   | paper's DHVT-S (CIFAR) |

This module imports nothing of vitkit but :mod:`vitkit.errors` and ``models.pretrained_cfg``: ``vitkit.models`` imports it to
register the models.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from timm.layers import Attention, ConvNormAct, LayerNorm, Mlp, PatchEmbed, to_2tuple
from timm.layers import trunc_normal_ as _trunc_normal
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models.pretrained_cfg import small_input_cfg

__all__ = [
    "DAFF",
    "SOPE",
    "Affine",
    "HeadInteractionAttention",
    "dhvt_parameter_count",
]


class Affine(nn.Module):
    """Per-channel ``x * alpha + beta`` on (B, C, H, W) (SOPE's pre/post affine)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha + self.beta


def sope_channels(in_chans: int, embed_dim: int, patch: int) -> list[int]:
    """Channel widths along SOPE's chain: in_chans -> d/2^(n-1) -> ... -> d, n = log2(patch)."""
    n = int(math.log2(patch))
    return [in_chans] + [embed_dim // 2 ** (n - 1 - i) for i in range(n)]


class SOPE(nn.Module):
    """Sequential overlapping patch embedding; a timm ``embed_layer`` (returns (B, N, C))."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,  # timm passes it; the convolutions are bias-free (BN follows)
        dynamic_img_pad: bool = False,
        strict_img_size: bool = True,
        output_fmt: str | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        p = self.patch_size[0]
        if self.patch_size[0] != self.patch_size[1] or p not in (2, 4, 8, 16):
            raise VitkitError(f"dhvt: SOPE needs a square patch of 2, 4, 8 or 16 pixels, got {patch_size}")
        if output_fmt not in (None, "NLC") or dynamic_img_pad:
            raise VitkitError("dhvt: SOPE supports neither dynamic_img_size nor dynamic_img_pad")
        for side in self.img_size:
            if side % p:
                raise VitkitError(f"dhvt: img_size {self.img_size} is not divisible by the patch size {p}")
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // p, self.img_size[1] // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        chans = sope_channels(in_chans, embed_dim, p)
        layers = []
        for i in range(len(chans) - 1):
            # GELU between convolutions; the code also ends patch 2's single conv with one
            last = i == len(chans) - 2
            layers.append(
                ConvNormAct(
                    chans[i],
                    chans[i + 1],
                    3,
                    stride=2,
                    act_layer=nn.GELU,
                    apply_act=not last or p == 2,
                )
            )
        self.pre_affine = Affine(in_chans)
        self.proj = nn.Sequential(*layers)
        self.post_affine = Affine(embed_dim)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.post_affine(self.proj(self.pre_affine(x)))
        return x.flatten(2).transpose(1, 2)


class DAFF(nn.Module):
    """Dynamic aggregation feed-forward; a timm ``mlp_layer``. Token 0 is the CLS token."""

    num_prefix_tokens = 1

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,  # timm passes it; DAFF has BatchNorm built in
        bias: bool = True,
        drop: float = 0.0,
        kernel_size: int = 3,
        **kwargs: Any,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden = hidden_features or in_features
        if out_features != in_features:
            raise VitkitError("dhvt: DAFF rescales the CLS token by the output channels: out must equal in")
        act = act_layer or nn.GELU
        # the code's convolutions keep their biases although BN follows: kept for the parameter count
        self.conv1 = ConvNormAct(in_features, hidden, 1, bias=True, act_layer=act)
        self.conv2 = ConvNormAct(hidden, hidden, kernel_size, groups=hidden, bias=True, act_layer=act)
        self.conv3 = ConvNormAct(hidden, out_features, 1, bias=True, apply_act=False)
        self.compress = nn.Linear(in_features, in_features // 4)
        self.excitation = nn.Linear(in_features // 4, in_features)
        self.act = act()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        p = self.num_prefix_tokens
        cls, tokens = x[:, :p], x[:, p:]
        side = math.isqrt(N - p)
        if side * side != N - p:
            raise VitkitError(f"dhvt: DAFF needs a square patch grid, got {N - p} patch tokens")
        t = tokens.transpose(1, 2).reshape(B, C, side, side)
        t = self.conv1(t)
        t = t + self.conv2(t)
        t = self.conv3(t)
        weight = self.excitation(self.act(self.compress(t.mean((2, 3)))))  # (B, C), no sigmoid
        cls = cls * weight[:, None, :]
        out = torch.cat([cls, t.flatten(2).transpose(1, 2)], dim=1)
        return self.drop(out)


class HeadInteractionAttention(nn.Module):
    """HI-MHSA; a timm ``attn_layer``. Token 0 is the CLS token; head tokens never leave the layer."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        if dim % num_heads:
            raise VitkitError(f"dhvt: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.ht_proj = nn.Linear(self.head_dim, dim)
        self.ht_norm = nn.LayerNorm(self.head_dim)
        self.act = nn.GELU()
        self.head_pos = nn.Parameter(torch.zeros(1, num_heads, dim))
        _trunc_normal(self.head_pos, std=0.02)
        # timm's attention over N + H tokens (vitkit swaps it for VitkitAttention: hooks work inside)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            scale_norm=scale_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=0.0,
            norm_layer=norm_layer,
        )
        self.proj_drop = nn.Dropout(proj_drop)

    def head_tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h = x.reshape(B, N, self.num_heads, self.head_dim).mean(1)  # (B, H, d/H)
        h = self.ht_proj(h).reshape(B, self.num_heads, self.num_heads, self.head_dim)
        h = self.act(self.ht_norm(h)).flatten(2)  # (B, H, d)
        return h + self.head_pos

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitkitError("dhvt: HI-MHSA takes no attention mask (its head tokens extend the sequence)")
        n = x.shape[1]
        x = self.attn(torch.cat([x, self.head_tokens(x)], dim=1))
        x, heads = x[:, :n], x[:, n:]
        x = torch.cat([x[:, :1] + heads.mean(1, keepdim=True), x[:, 1:]], dim=1)
        return self.proj_drop(x)


# -- the registered family --------------------------------------------------------------------


def _cfg(img: int) -> dict[str, Any]:
    return small_input_cfg(img, first_conv="patch_embed.proj.0.conv")


_ARCHS = {
    "nano": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "micro": dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=3.0),
    "tiny": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=4, mlp_ratio=4.0),
    "small": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=8, mlp_ratio=4.0),
}

default_cfgs = generate_default_cfgs(
    {
        "vitkit_dhvt_nano_p4_16": _cfg(16),
        "vitkit_dhvt_micro_p4_16": _cfg(16),
        "vitkit_dhvt_tiny_p4_32": _cfg(32),
        "vitkit_dhvt_small_p4_32": _cfg(32),
    }
)


def _build(
    variant: str,
    arch: str,
    pretrained: bool,
    *,
    sope: bool = True,
    daff: bool = True,
    head_tokens: bool = True,
    **kwargs: Any,
) -> VisionTransformer:
    args: dict[str, Any] = {**_ARCHS[arch], "num_classes": 10, **kwargs}
    for key, allowed in (("class_token", True), ("reg_tokens", 0), ("no_embed_class", False)):
        if key in args and args[key] != allowed:
            raise VitkitError(
                f"{variant}: DHVT needs {key}={allowed!r} (one CLS prefix token), got {args[key]!r}"
            )
    if args.get("dynamic_img_size"):
        raise VitkitError(f"{variant}: DHVT does not support dynamic_img_size")
    img = to_2tuple(args["img_size"])
    if img[0] != img[1]:
        raise VitkitError(
            f"{variant}: DHVT needs a square input (its DAFF works on a square grid), got {img}"
        )
    for reserved in ("embed_layer", "attn_layer", "mlp_layer", "pos_embed"):
        if reserved in args:
            raise VitkitError(f"{variant}: '{reserved}' is set by DHVT itself (use sope/daff/head_tokens)")
    args["embed_layer"] = SOPE if sope else PatchEmbed
    args["pos_embed"] = "none" if sope else "learn"
    args["attn_layer"] = HeadInteractionAttention if head_tokens else Attention
    args["mlp_layer"] = DAFF if daff else Mlp
    args.setdefault("norm_layer", partial(LayerNorm, eps=1e-6))
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=args["depth"] - 1, feature_cls="getter"),
        **args,
    )


@register_model
def vitkit_dhvt_nano_p4_16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """2-block, 32-wide DHVT for unit tests (16x16 input, patch 4)."""
    return _build("vitkit_dhvt_nano_p4_16", "nano", pretrained, **kwargs)


@register_model
def vitkit_dhvt_micro_p4_16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """4-block, 64-wide DHVT for 16x16 inputs, about as many parameters as vitkit_micro_p4_16."""
    return _build("vitkit_dhvt_micro_p4_16", "micro", pretrained, **kwargs)


@register_model
def vitkit_dhvt_tiny_p4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DHVT-T of the paper's CIFAR setting: 192 wide, 12 blocks, 4 heads, patch 4, 32x32 input."""
    return _build("vitkit_dhvt_tiny_p4_32", "tiny", pretrained, **kwargs)


@register_model
def vitkit_dhvt_small_p4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DHVT-S of the paper's CIFAR setting: 384 wide, 12 blocks, 8 heads, patch 4, 32x32 input."""
    return _build("vitkit_dhvt_small_p4_32", "small", pretrained, **kwargs)


def dhvt_parameter_count(
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    patch_size: int,
    num_classes: int = 10,
    in_chans: int = 3,
    img_size: int = 32,
    *,
    sope: bool = True,
    daff: bool = True,
    head_tokens: bool = True,
) -> int:
    """Closed-form parameter count of a DHVT built here (qkv bias on, as timm's default)."""
    d, hidden, hd = embed_dim, int(embed_dim * mlp_ratio), embed_dim // num_heads
    if sope:
        ch = sope_channels(in_chans, d, patch_size)
        embed = 2 * in_chans + 2 * d  # pre/post affine
        embed += sum(9 * ch[i] * ch[i + 1] + 2 * ch[i + 1] for i in range(len(ch) - 1))  # conv + BN
    else:
        grid = (img_size // patch_size) ** 2
        embed = in_chans * patch_size**2 * d + d + (grid + 1) * d  # conv + bias + pos_embed
    attn = 4 * d * d + 4 * d  # qkv + proj with biases
    if head_tokens:
        attn += hd * d + d + 2 * hd + num_heads * d  # ht_proj, ht_norm, head_pos
    if daff:
        mlp = (d * hidden + hidden) + 2 * hidden  # conv1 + BN
        mlp += (9 * hidden + hidden) + 2 * hidden  # depthwise + BN
        mlp += (hidden * d + d) + 2 * d  # conv3 + BN
        mlp += (d * (d // 4) + d // 4) + (d // 4 * d + d)  # channel recalibration of CLS
    else:
        mlp = d * hidden + hidden + hidden * d + d
    block = 2 * d + attn + 2 * d + mlp  # norm1, attn, norm2, mlp
    return embed + d + depth * block + 2 * d + d * num_classes + num_classes  # + cls, norm, head

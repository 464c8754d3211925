"""DualToken-ViT for small images: a conv local branch and position-aware global tokens, as timm models.

Paper: Chu, Chen, Chen, Wang, Wu, Huang & Qian, "DualToken-ViT: Position-aware Efficient Vision
Transformer with Dual Token Fusion" (arXiv 2309.12424, 2023). **No official code exists** (none was
found in any public repository): this module is our reading of the paper, every choice among
readings is listed below, and nothing here has been checked against the authors' implementation.

A stage-wise (hierarchical) model on a (B, C, H, W) map. Each :class:`DualTokenBlock` takes the map
``X`` and the position-aware global tokens ``G`` (B, g*g, C), a g x g grid aligned with the image that
is carried through every block and stage, and returns both updated. Per block, in order:

1. local branch (the "conv encoder"): ``X_loc = X + PW2(GELU(PW1(BN(DW3x3(X)))))``;
2. step-wise downsampling of ``X_loc`` to the g x g grid: ``X_ds = (BN . DW3x3/2)^s (X_loc)``,
   ``s`` stride-2 steps (as many as the stage's map needs; none when it already is g x g);
3. position-aware fusion, cell by cell: ``Z = w0 * X_ds + w1 * G`` with ``(w0, w1) = softmax(omega)``,
   ``omega`` two learned logits (equal weights at init);
4. global aggregation: ``G' = Z + MSA(LN(Z))``, then ``G' = G' + MLP(LN(G'))``: timm's pre-norm
   ``Block`` (its ``Attention`` becomes vitkit's ``VitkitAttention``: ``attention_maps`` gives
   (B, heads, g*g, g*g) per block); ``G'`` is passed to the next block;
5. global branch (broadcast): ``X_glob = proj(softmax(q(LN(X_loc)) k(LN(G'))^T / sqrt(d)) v(LN(G')))``
   per head: every one of the H*W tokens queries the g*g updated global tokens, O(H W g^2 C);
6. fusion: ``Y = X_loc + X_glob``, then ``out = Y + MLP(LN(Y))`` (timm ``Mlp``).

The model: a conv stem (two 3x3 ConvNormAct, the first of stride 2), stages of blocks, a strided 3x3
ConvNorm between stages for ``X`` and ``LN + Linear`` for ``G`` (its grid stays g x g), a learned
initial grid ``G_0`` (``global_tokens``, no weight decay), a final LayerNorm2d, and timm's
``ClassifierHead`` (global average pool of the map; the global tokens are not pooled).

Readings chosen where the paper leaves a choice open:

- **Local branch**: depthwise 3x3, BatchNorm, a 1x1 inverted bottleneck of ``mlp_ratio`` with GELU,
  and a residual; the paper names a convolutional encoder, not its exact layers, ratio or norm.
- **Step-wise downsampling**: repeated depthwise 3x3 stride-2 convolutions each followed by
  BatchNorm, no activation (the paper: step by step rather than one large pooling step; the layer
  type is ours). Ceil halving, so a 7x7 map reaches a 4x4 grid in one step.
- **Global-token update**: the elementwise weighted sum of step 3 (softmax-normalised scalars), then
  a full pre-norm transformer block over the fused grid (self-attention, and the MLP on the global
  tokens that the paper notes describe). Alternatives we did not take: a cross-attention from ``G`` to
  ``X_ds``, per-channel weights, or an MLP without self-attention.
- **Broadcast** uses the *updated* ``G'`` of the same block (aggregate, then broadcast, the order we
  read in LightViT, not checked against its code), with its own ``q`` / ``kv`` / ``proj`` projections
  and LayerNorms on both sides.
- **Fusion** is an element-wise addition with the local tokens as the residual stream, followed by
  a pre-norm token MLP.
- **Initial global tokens**: a learned g x g grid (trunc-normal 0.02), the grid version of LightViT's
  learned global tokens; the same grid size in every stage, re-projected to each stage's width by
  ``LN + Linear``.
- **Scale** for 16-32 px inputs trained from scratch: two stages instead of three, a stride-2 stem
  instead of stride 8 (maps of 8x8 then 4x4 at 16 px, 16x16 then 8x8 at 32 px), a 4x4 global grid
  instead of 7x7, sizes matched to vitkit's plain presets (table). No ImageNet training, no
  pretrained weights; normalization mean = std = 0.5 (vitkit's presets).

vitkit's hooks: the aggregation attention is timm's ``Attention`` inside timm's ``Block``, so
``VitkitAttention`` replaces it and every hook of ``models/attention.py`` reaches it (maps over the
g*g global tokens, one per block, in block order across stages). The broadcast is a cross-attention
(H*W queries, g*g keys): not a square map, so it is a plain module here (its linear layers are
quantized like any other ``nn.Linear``; its two matrix products stay in float).

| name                       | img | stem | widths  | depths | heads | mlp | grid | maps         | params (10 cls) | plain ViT match            |
|----------------------------|-----|------|---------|--------|-------|-----|------|--------------|-----------------|----------------------------|
| vitkit_dualtoken_nano_16   | 16  | /2   | 16, 32  | 1, 1   | 1, 2  | 2   | 4x4  | 8x8, 4x4     | 35k (tests)     | vitkit_nano_p4_16 (20k)    |
| vitkit_dualtoken_micro_16  | 16  | /2   | 32, 64  | 1, 2   | 1, 2  | 2   | 4x4  | 8x8, 4x4     | 0.22M           | vitkit_micro_p4_16 (0.21M) |
| vitkit_dualtoken_tiny_32   | 32  | /2   | 96, 192 | 1, 2   | 3, 6  | 2   | 4x4  | 16x16, 8x8   | 1.92M           | vitkit_tiny_p4_32 (1.81M)  |

``img_size`` (square; each stage's map must halve onto the grid: 16, 28 to 32, 49 to 64 ... with the
4x4 grid), ``in_chans``, ``num_classes``, ``drop_rate``, ``drop_path_rate``, ``global_pool``,
``embed_dim`` / ``depth`` / ``num_heads`` (one value per stage), ``mlp_ratio`` and ``qkv_bias`` are
constructor arguments; ``global_grid`` too, but a run directory only records the arguments vitkit's
manifest allows (``models/manifest.py``), so a run built with another grid does not reload.

This module imports nothing of vitkit but :mod:`vitkit.errors` and ``models.pretrained_cfg``:
``vitkit.models`` imports it to register the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import ClassifierHead, ConvNormAct, DropPath, LayerNorm, LayerNorm2d, Mlp, to_2tuple
from timm.layers import trunc_normal_ as _trunc_normal
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkit.errors import VitkitError
from vitkit.models.pretrained_cfg import small_input_cfg

__all__ = [
    "ConvEncoder",
    "DualTokenBlock",
    "DualTokenStage",
    "DualTokenViT",
    "GlobalBroadcast",
    "StepwiseDownsample",
    "downsample_steps",
]


def _half(side: int) -> int:
    """The output side of a 3x3 stride-2 convolution with padding 1: ceil(side / 2)."""
    return (side + 1) // 2


def downsample_steps(side: int, grid: int) -> int:
    """How many stride-2 steps bring a ``side`` x ``side`` map onto the ``grid`` x ``grid`` global grid
    (ceil halving); :class:`VitkitError` when no number of steps lands on it exactly."""
    steps, s = 0, side
    while s > grid:
        s, steps = _half(s), steps + 1
    if s != grid:
        raise VitkitError(
            f"dualtoken: a {side}x{side} feature map cannot be halved step by step onto the {grid}x{grid} "
            "global grid; choose an img_size whose stage maps halve onto it (16, 32, 64 ... or 28 for "
            "a 4x4 grid) or another global_grid"
        )
    return steps


class ConvEncoder(nn.Module):
    """The local branch: ``x + drop_path(PW2(GELU(PW1(BN(DW(x))))))`` on (B, C, H, W) (eq. 1)."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0, kernel_size: int = 3, drop_path: float = 0.0):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, use_conv=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm(self.dw(x))))


class StepwiseDownsample(nn.Sequential):
    """``steps`` x (depthwise 3x3 stride-2 conv, BatchNorm) (eq. 2); the identity for 0 steps."""

    def __init__(self, dim: int, steps: int):
        super().__init__(
            *[
                ConvNormAct(dim, dim, 3, stride=2, padding=1, groups=dim, bias=True, apply_act=False)
                for _ in range(steps)
            ]
        )
        self.steps = steps


class GlobalBroadcast(nn.Module):
    """Multi-head cross-attention: every token of ``x`` (B, N, C) queries the global tokens ``g``
    (B, M, C) (eq. 5): ``proj(softmax(q(x) k(g)^T / sqrt(d)) v(g))``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise VitkitError(f"dualtoken: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = g.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(g).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, M)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class DualTokenBlock(nn.Module):
    """One DualToken block on a (B, C, H, W) map and its (B, g*g, C) global tokens (module docstring,
    eqs. 1-6); ``forward(x, g) -> (x, g)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        steps: int,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.local = ConvEncoder(dim, mlp_ratio, drop_path=drop_path)
        self.downsample = StepwiseDownsample(dim, steps)
        self.fuse_logits = nn.Parameter(torch.zeros(2))  # (X_ds, G) weights = softmax: 0.5 / 0.5 at init
        self.aggregate = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path)
        self.norm_x = LayerNorm(dim)
        self.norm_g = LayerNorm(dim)
        self.broadcast = GlobalBroadcast(dim, num_heads, qkv_bias=qkv_bias)
        self.norm_mlp = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def fuse(self, x_ds: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Eq. 3: the cell-by-cell weighted sum of the downsampled tokens and the global tokens."""
        w = self.fuse_logits.softmax(0)
        return w[0] * x_ds + w[1] * g

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, H, W = x.shape
        x = self.local(x)  # eq. 1
        x_ds = self.downsample(x).flatten(2).transpose(1, 2)  # eq. 2: (B, g*g, C)
        g = self.aggregate(self.fuse(x_ds, g))  # eqs. 3-4
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path(self.broadcast(self.norm_x(t), self.norm_g(g)))  # eqs. 5-6
        t = t + self.drop_path(self.mlp(self.norm_mlp(t)))
        return t.transpose(1, 2).reshape(B, C, H, W), g


class DualTokenStage(nn.Module):
    """A strided 3x3 ConvNorm for the map and ``LN + Linear`` for the global tokens (not in the first
    stage), then the stage's blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        steps: int,
        first: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: Sequence[float],
    ):
        super().__init__()
        if first:
            self.downsample: nn.Module = nn.Identity()
            self.global_proj: nn.Module = nn.Identity()
        else:
            self.downsample = ConvNormAct(in_dim, dim, 3, stride=2, padding=1, apply_act=False)
            self.global_proj = nn.Sequential(LayerNorm(in_dim), nn.Linear(in_dim, dim))
        self.blocks = nn.ModuleList(
            DualTokenBlock(dim, num_heads, steps, mlp_ratio, qkv_bias, drop_path[i]) for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, g = self.downsample(x), self.global_proj(g)
        for blk in self.blocks:
            x, g = self._run(blk, x, g)
        return x, g

    def _run(
        self, blk: DualTokenBlock, x: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint(blk, x, g, use_reentrant=False)
        return blk(x, g)


def _per_stage(value: int | float | Sequence[Any], stages: int, name: str) -> tuple[Any, ...]:
    if isinstance(value, (int, float)):
        return (value,) * stages
    value = tuple(value)
    if len(value) != stages:
        raise VitkitError(f"dualtoken: {name} needs one value per stage ({stages}), got {list(value)}")
    return value


def _num_stages(embed_dim: int | Sequence[int], depth: int | Sequence[int]) -> int:
    for value in (embed_dim, depth):
        if not isinstance(value, (int, float)):
            return len(tuple(value))
    raise VitkitError("dualtoken: give embed_dim or depth as one value per stage")


class DualTokenViT(nn.Module):
    """DualToken-ViT (module docstring): a conv stem, stages of :class:`DualTokenBlock`, position-aware
    global tokens carried through all of them, and timm's classifier head. timm's feature contract:
    ``forward_features`` (the final normalised map, B x C x h x w), ``forward_head(pre_logits=)``,
    ``forward_intermediates`` (one map per block), no prefix tokens."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: Sequence[int] = (32, 64),
        depth: Sequence[int] = (1, 2),
        num_heads: int | Sequence[int] = (1, 2),
        mlp_ratio: float = 2.0,
        global_grid: int = 4,
        qkv_bias: bool = True,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        n = _num_stages(embed_dim, depth)
        dims = tuple(int(d) for d in _per_stage(embed_dim, n, "embed_dim"))
        depths = tuple(int(d) for d in _per_stage(depth, n, "depth"))
        heads = tuple(int(h) for h in _per_stage(num_heads, len(dims), "num_heads"))
        h, w = to_2tuple(img_size)
        if h != w:
            raise VitkitError(f"dualtoken: needs a square input (the global grid is square), got {h}x{w}")
        if global_grid < 1 or any(d < 1 for d in depths):
            raise VitkitError(
                f"dualtoken: global_grid and every depth must be >= 1, got {global_grid}, {depths}"
            )
        self.img_size = (int(h), int(w))
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_grid = int(global_grid)
        self.num_prefix_tokens = 0
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        stem_mid = max(dims[0] // 2, 8)
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, stem_mid, 3, stride=2, padding=1, act_layer=nn.GELU),
            ConvNormAct(stem_mid, dims[0], 3, stride=1, padding=1, act_layer=nn.GELU),
        )
        self.global_tokens = nn.Parameter(torch.zeros(1, self.global_grid**2, dims[0]))

        side, reduction = _half(self.img_size[0]), 2
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info, self.map_sides, start = [], [], [], 0
        for i, (dim, d, nh) in enumerate(zip(dims, depths, heads)):
            if i > 0:
                side, reduction = _half(side), reduction * 2
            steps = downsample_steps(side, self.global_grid)
            stages.append(
                DualTokenStage(
                    dims[i - 1] if i else dim,
                    dim,
                    d,
                    nh,
                    steps,
                    i == 0,
                    mlp_ratio,
                    qkv_bias,
                    rates[start : start + d],
                )
            )
            self.map_sides.append(side)
            for j in range(d):
                self.feature_info.append(
                    dict(num_chs=dim, reduction=reduction, module=f"stages.{i}.blocks.{j}")
                )
            start += d
        self.stages = nn.ModuleList(stages)
        self.embed_dims, self.depths = dims, depths
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = LayerNorm2d(dims[-1])
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)

        _trunc_normal(self.global_tokens, std=0.02)
        self.apply(_init_weights)

    # -- timm's model contract ------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"global_tokens"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem|^global_tokens",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.(downsample|global_proj)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.img_size:
            raise VitkitError(
                f"dualtoken: built for {self.img_size[0]}x{self.img_size[1]} inputs (its global grid is tied "
                f"to the stage maps), got {tuple(x.shape[-2:])}; build it with img_size"
            )

    def _initial_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_tokens.expand(x.shape[0], -1, -1)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's map (before the final norm) and global tokens (B, g*g, C)."""
        self._check_input(x)
        x = self.stem(x)
        g = self._initial_tokens(x)
        for stage in self.stages:
            x, g = stage(x, g)
        return x, g

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_tokens(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` with one feature per block (across stages): (B, C, h, w),
        or (B, h*w, C) for ``output_fmt="NLC"``; ``norm`` applies the final norm to the last block's."""
        if output_fmt not in ("NCHW", "NLC"):
            raise VitkitError(f"dualtoken: output_fmt must be NCHW or NLC, got {output_fmt!r}")
        total = sum(len(s.blocks) for s in self.stages)
        take, max_index = feature_take_indices(total, indices)
        self._check_input(x)
        x = self.stem(x)
        g = self._initial_tokens(x)
        feats: list[torch.Tensor] = []
        idx = -1
        for stage in self.stages:
            if stop_early and idx >= max_index:
                break
            x, g = stage.downsample(x), stage.global_proj(g)
            for blk in stage.blocks:
                if stop_early and idx >= max_index:
                    break
                x, g = stage._run(blk, x, g)
                idx += 1
                if idx in take:
                    f = self.norm(x) if norm and idx == total - 1 else x
                    feats.append(f.flatten(2).transpose(1, 2) if output_fmt == "NLC" else f)
        if intermediates_only:
            return feats
        return (self.norm(x) if idx == total - 1 else x), feats

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last one ``indices`` selects (timm's contract)."""
        total = sum(len(s.blocks) for s in self.stages)
        take, max_index = feature_take_indices(total, indices)
        keep, stages = max_index + 1, []
        for stage in self.stages:
            if keep <= 0:
                break
            stage.blocks = stage.blocks[:keep]
            keep -= len(stage.blocks)
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        pruned_end = max_index < total - 1
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
        elif prune_head:
            self.reset_classifier(0, "")
        return take


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        _trunc_normal(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _cfg(img: int) -> dict[str, Any]:
    return small_input_cfg(img, first_conv="stem.0.conv", classifier="head.fc")


default_cfgs = generate_default_cfgs(
    {
        "vitkit_dualtoken_nano_16": _cfg(16),
        "vitkit_dualtoken_micro_16": _cfg(16),
        "vitkit_dualtoken_tiny_32": _cfg(32),
    }
)

_ARCHS = {
    "nano": dict(img_size=16, embed_dim=(16, 32), depth=(1, 1), num_heads=(1, 2), mlp_ratio=2.0),
    "micro": dict(img_size=16, embed_dim=(32, 64), depth=(1, 2), num_heads=(1, 2), mlp_ratio=2.0),
    "tiny": dict(img_size=32, embed_dim=(96, 192), depth=(1, 2), num_heads=(3, 6), mlp_ratio=2.0),
}


def _build(variant: str, arch: str, pretrained: bool, **kwargs: Any) -> DualTokenViT:
    args: dict[str, Any] = {**_ARCHS[arch], "num_classes": 10, **kwargs}
    for key in ("class_token", "reg_tokens"):
        if args.pop(key, None):
            raise VitkitError(f"{variant}: DualToken-ViT has global tokens, not class or register tokens")
    total = sum(_per_stage(args["depth"], _num_stages(args["embed_dim"], args["depth"]), "depth"))
    model = build_model_with_cfg(
        DualTokenViT,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=total - 1, feature_cls="getter"),
        **args,
    )
    if isinstance(model, DualTokenViT):  # not the feature wrapper of ``features_only=True``
        # the registered cfg names the preset's size: record the one built (model_input_size reads it)
        cfg = dict(model.pretrained_cfg)
        cfg["input_size"] = (model.in_chans, *model.img_size)
        cfg.pop("test_input_size", None)
        model.pretrained_cfg = model.default_cfg = cfg
    return model


@register_model
def vitkit_dualtoken_nano_16(pretrained: bool = False, **kwargs: Any) -> DualTokenViT:
    """DualToken-ViT for unit tests: widths 16/32, one block per stage, a 4x4 global grid (16x16 input)."""
    return _build("vitkit_dualtoken_nano_16", "nano", pretrained, **kwargs)


@register_model
def vitkit_dualtoken_micro_16(pretrained: bool = False, **kwargs: Any) -> DualTokenViT:
    """DualToken-ViT for 16x16 inputs: widths 32/64, 1 + 2 blocks, a 4x4 global grid; the match of
    vitkit_micro_p4_16 in parameters."""
    return _build("vitkit_dualtoken_micro_16", "micro", pretrained, **kwargs)


@register_model
def vitkit_dualtoken_tiny_32(pretrained: bool = False, **kwargs: Any) -> DualTokenViT:
    """DualToken-ViT for 32x32 inputs: widths 96/192, 1 + 2 blocks, a 4x4 global grid; the match of
    vitkit_tiny_p4_32 in parameters."""
    return _build("vitkit_dualtoken_tiny_32", "tiny", pretrained, **kwargs)

"""ViT-CoMer: Xia et al., "ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction
for Dense Predictions" (CVPR 2024), after the official code (github.com/Traffic-X/ViT-CoMer @ b57f386,
segmentation/mmseg_custom/models/backbones/{vit_comer,comer_modules}.py), as a transform of a dense
model (``--task segmentation --transform vit-comer``): it builds the pyramid the head reads, running the
plain timm ViT's own blocks between its interactions. Nothing of timm is forked or patched: the encoder
calls the ViT's ``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre`` and ``blocks`` in order.

- **CNN branch** (``spm``): a 3-conv stem and three stride-2 convs give c1..c4 at strides p/4, p/2, p and
  2p of a patch-p ViT (the official stem, conv s2 + max-pool, is for p = 16; p = 8 drops the max-pool,
  p = 4 also the stem's stride), each projected to the ViT width D; c2, c3, c4 get level embeddings
  and are concatenated into one token sequence ``c`` (c3 is the ViT's token grid).
- **One interaction per quarter of the blocks** (``CTIBlock``): MRFP (Linear D -> 6D, per level half the
  channels through a depthwise 3x3 and half through a 5x5, BN, GELU, GELU, Linear back; *no residual*,
  as in the code), the ViT patch tokens added to c's grid level, **CTI_toV** (multi-scale deformable
  self-attention over c's three levels, a ConvFFN, the three levels resampled to the grid and summed,
  added to the ViT tokens through ``gamma``, initialised to 0), the quarter's ViT blocks, then
  **CTI_toC** (the new tokens added to c's grid level; ``c = LN(c) + MSDeformAttn + ConvFFN``); the last
  interaction adds four extra CTIs (ConvFFN, then the same self-attention).
- **Outputs**: the ViT tokens after each quarter, resized x4, x2, x1, x1/2, added to
  ``[ConvT(c2) + c1, c2, c3, c4]``, each through a BatchNorm: four maps of width D.

Differences from the official code, on purpose (the test compares with a line-by-line
re-implementation of the official modules, tests/architecture/comer_reference.py):
- The multi-scale deformable attention is pure PyTorch (``grid_sample``; Deformable-DETR's
  ``ms_deform_attn_core_pytorch``), not the CUDA op; it samples the same points.
- SyncBatchNorm -> BatchNorm2d (one process on CPU).
- ``N // 21`` token splits -> explicit level sizes (same result; a grid with an odd side is refused).
- The timm ViT keeps its prefix tokens (class token, registers) in the sequence its blocks see; the
  interactions read and write the patch tokens only (the official ViT has no class token in the path).
- The four maps are handed to the model's head at the head's own pyramid: each head level takes the
  CoMer level of the nearest stride (with a 16 px patch the strides are the same, 4-32 px), average-
  pooled or bilinearly resized to the head's size, and a 1x1 convolution adapts D to the head's width
  where they differ (the official UperNet is built with ``in_channels=[D]*4``).
- ``conv_inplane`` (the CNN width, official 64) and the deformable heads are options; the interaction
  drop-path is the official constant 0.1 (``drop_path``). The four interactions take a quarter of the
  blocks each (the official 12-block split [0-2], [3-5], [6-8], [9-11]); with fewer than four blocks
  some interactions have none of their own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models.manifest import record_transform
from vitkit.registry import AS_IS, Technique, TrainTransform, parse_config, register


class ViTCoMerConfig(BaseModel):
    """``--transform vit-comer:key=value,...``"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conv_inplane: int = Field(64, ge=4, le=512, description="CNN branch width (official 64)")
    n_points: int = Field(4, ge=1, le=16, description="sampling points per head and level")
    deform_heads: int | None = Field(
        None,
        ge=1,
        le=64,
        description="deformable-attention heads (default: 6 if they divide D, else 4, 2, 1)",
    )
    cffn_ratio: float = Field(0.25, gt=0, le=4, description="ConvFFN hidden width / D")
    dim_ratio: float = Field(6.0, gt=0, le=8, description="MRFP hidden width / D (tiny 6, small 1.5, base 1)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="drop-path of the interaction modules")
    extra_cti: bool = Field(True, description="the last interaction's four extra CTIs")


# -- multi-scale deformable attention (pure PyTorch) -------------------------------------------------
def ms_deform_attn_core(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable-DETR's ``ms_deform_attn_core_pytorch``: value (N, S, M, Dh); locations (N, Lq, M, L, P, 2)
    in [0, 1] (x, y); weights (N, Lq, M, L, P) -> (N, Lq, M * Dh). Bilinear, zeros outside."""
    n, _, m, d = value.shape
    _, lq, _, _, p, _ = sampling_locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    weights = attention_weights.transpose(1, 2).reshape(n * m, lq, len(shapes), p)
    out = None
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(
            v, g, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (NM, d, Lq, P)
        # the weighted sum over the points, level by level (the reference stacks all levels first: the
        # same sum in another order, without a copy of every sample)
        part = torch.einsum("bdqp,bqp->bdq", sampled, weights[:, :, lvl])
        out = part if out is None else out + part
    out = out.reshape(n, m * d, lq)
    return out.transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), its official init."""

    def __init__(self, dim: int, n_levels: int = 3, n_heads: int = 6, n_points: int = 4, ratio: float = 1.0):
        super().__init__()
        if dim % n_heads:
            raise VitkitError(f"vit-comer: {n_heads} deformable heads do not divide the width {dim}")
        self.dim, self.n_levels, self.n_heads, self.n_points, self.ratio = (
            dim,
            n_levels,
            n_heads,
            n_points,
            ratio,
        )
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, int(dim * ratio))
        self.output_proj = nn.Linear(int(dim * ratio), dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        feat: torch.Tensor,
        shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        n, lq, _ = query.shape
        value = self.value_proj(feat).view(
            n, feat.shape[1], self.n_heads, int(self.ratio * self.dim) // self.n_heads
        )
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level: divided by that level's (W, H)
        normalizer = query.new_tensor([[w, h] for h, w in shapes])
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )
        return self.output_proj(ms_deform_attn_core(value, shapes, locations, weights))


def reference_points(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1] (x, y): (1, sum HW, 1, 2)."""
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, device=device),
            torch.linspace(0.5, w - 0.5, w, device=device),
            indexing="ij",
        )
        points.append(torch.stack((xs.reshape(-1) / w, ys.reshape(-1) / h), -1)[None])
    return torch.cat(points, 1)[:, :, None]


# -- the three token levels as maps ----------------------------------------------------------------
def _split(c: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """(B, sum HW, C) -> one (B, C, H, W) map per level."""
    b, _, ch = c.shape
    return [
        t.transpose(1, 2).reshape(b, ch, h, w)
        for t, (h, w) in zip(c.split([h * w for h, w in shapes], 1), shapes)
    ]


def _join(maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


class DWConv(nn.Module):
    """One depthwise 3x3 convolution applied to each level (official ``DWConv``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        return _join([self.dwconv(m) for m in _split(x, shapes)])


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x), shapes)))))


class MultiDWConv(nn.Module):
    """Per level: half the channels through a depthwise 3x3, half through a 5x5; BN; GELU."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        for i, k in enumerate((3, 5, 3, 5, 3, 5), start=1):
            setattr(self, f"dwconv{i}", nn.Conv2d(half, half, k, 1, k // 2, bias=True, groups=half))
        for i in (1, 2, 3):
            setattr(self, f"act{i}", nn.GELU())
            setattr(self, f"bn{i}", nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        out = []
        for lvl, m in enumerate(_split(x, shapes)):
            c = m.shape[1]
            a = getattr(self, f"dwconv{2 * lvl + 1}")(m[:, : c // 2])
            b = getattr(self, f"dwconv{2 * lvl + 2}")(m[:, c // 2 :])
            out.append(getattr(self, f"act{lvl + 1}")(getattr(self, f"bn{lvl + 1}")(torch.cat([a, b], 1))))
        return _join(out)


class MRFP(nn.Module):
    """Multi-receptive-field feature pyramid: fc1, MultiDWConv, GELU, fc2 (no residual, as the code)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = MultiDWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x), shapes)))))


def _ln(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class MultiscaleExtractor(nn.Module):
    """``q + MSDeformAttn(LN(q), LN(feat))``, then ``+ ConvFFN(LN(.))`` (self-attention over c here)."""

    def __init__(self, dim: int, heads: int, points: int, cffn_ratio: float, drop_path: float):
        super().__init__()
        from timm.layers import DropPath

        self.query_norm, self.feat_norm = _ln(dim), _ln(dim)
        self.attn = MSDeformAttn(dim, 3, heads, points)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = _ln(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query, ref, feat, shapes):
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)
        return query + self.drop_path(self.ffn(self.ffn_norm(query), shapes))


def _add_to_grid(c: torch.Tensor, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Add the ViT patch tokens to c's grid level (the middle one)."""
    n0 = shapes[0][0] * shapes[0][1]
    n1 = shapes[1][0] * shapes[1][1]
    return torch.cat([c[:, :n0], c[:, n0 : n0 + n1] + x, c[:, n0 + n1 :]], 1)


class CTIToC(nn.Module):
    """ViT -> CNN: c's grid level += x; then ``c = LN(c) + attn + ConvFFN`` (official ``CTI_toC``)."""

    def __init__(
        self, dim: int, heads: int, points: int, cffn_ratio: float, drop_path: float, ffn_first: bool = False
    ):
        super().__init__()
        from timm.layers import DropPath

        self.query_norm, self.feat_norm = _ln(dim), _ln(dim)
        self.ffn_first = ffn_first  # the extra CTIs (official Extractor_CTI) run a ConvFFN first
        if ffn_first:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = _ln(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cfinter = MultiscaleExtractor(dim, heads, points, cffn_ratio, drop_path)

    def forward(self, c, x, ref, shapes):
        c = _add_to_grid(c, x, shapes)
        if self.ffn_first:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), shapes))
        return self.cfinter(self.query_norm(c), ref, self.feat_norm(c), shapes)


class CTIToV(nn.Module):
    """CNN -> ViT: attention over c (no residual from c), ConvFFN, levels resampled to the grid and
    summed, added to the ViT tokens through ``gamma`` (0 at init)."""

    def __init__(self, dim: int, heads: int, points: int, cffn_ratio: float, drop_path: float):
        super().__init__()
        from timm.layers import DropPath

        self.query_norm, self.feat_norm = _ln(dim), _ln(dim)
        self.attn = MSDeformAttn(dim, 3, heads, points)
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = _ln(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, c, ref, shapes):
        c1 = self.attn(self.query_norm(c), ref, self.feat_norm(c), shapes)
        c1 = c1 + self.drop_path(self.ffn(self.ffn_norm(c1), shapes))
        fine, grid, coarse = _split(c1, shapes)
        fine = F.interpolate(fine, scale_factor=0.5, mode="bilinear", align_corners=False)
        coarse = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x + self.gamma * (fine + grid + coarse).flatten(2).transpose(1, 2)


class CTIBlock(nn.Module):
    """One interaction around a group of ViT blocks (official ``CTIBlock``)."""

    def __init__(self, dim: int, cfg: ViTCoMerConfig, heads: int, extra: bool):
        super().__init__()
        args = (dim, heads, cfg.n_points, cfg.cffn_ratio, cfg.drop_path)
        self.cti_tov = CTIToV(*args)
        self.cti_toc = CTIToC(*args)
        self.extra_CTIs = nn.Sequential(*(CTIToC(*args, ffn_first=True) for _ in range(4))) if extra else None
        self.mrfp = MRFP(dim, int(dim * cfg.dim_ratio))

    def forward(self, t, c, blocks, npt: int, ref, shapes):
        x = t[:, npt:]
        c = self.mrfp(c, shapes)
        c = _add_to_grid(c, x, shapes)
        x = self.cti_tov(x, c, ref, shapes)
        t = torch.cat([t[:, :npt], x], 1)
        for blk in blocks:
            t = blk(t)
        x = t[:, npt:]
        c = self.cti_toc(c, x, ref, shapes)
        if self.extra_CTIs is not None:
            for cti in self.extra_CTIs:
                c = cti(c, x, ref, shapes)
        return t, c


# -- the CNN branch ---------------------------------------------------------------------------------
def _cbr(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNNBranch(nn.Module):
    """The official ``CNN`` (spm): c1..c4 at strides p/4, p/2, p, 2p, projected to the ViT width."""

    def __init__(self, in_chans: int, inplane: int, dim: int, patch: int):
        super().__init__()
        stem = [
            *_cbr(in_chans, inplane, 2 if patch >= 8 else 1),
            *_cbr(inplane, inplane, 1),
            *_cbr(inplane, inplane, 1),
        ]
        stem.append(nn.MaxPool2d(3, 2, 1) if patch >= 16 else nn.Identity())
        self.stem = nn.Sequential(*stem)
        self.conv2 = nn.Sequential(*_cbr(inplane, 2 * inplane, 2))
        self.conv3 = nn.Sequential(*_cbr(2 * inplane, 4 * inplane, 2))
        self.conv4 = nn.Sequential(*_cbr(4 * inplane, 4 * inplane, 2))
        self.fc1 = nn.Conv2d(inplane, dim, 1)
        self.fc2 = nn.Conv2d(2 * inplane, dim, 1)
        self.fc3 = nn.Conv2d(4 * inplane, dim, 1)
        self.fc4 = nn.Conv2d(4 * inplane, dim, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


def _official_init(m: nn.Module) -> None:
    """``ViTCoMer._init_weights``: trunc-normal Linear, unit norms, He-normal (fan-out) convolutions."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.data.zero_()


# -- the encoder a DenseModel calls --------------------------------------------------------------
class ViTCoMerEncoder(nn.Module):
    """``encoder(vit, images)`` -> the head's pyramid (see the module docstring)."""

    def __init__(self, dense: nn.Module, cfg: ViTCoMerConfig):
        super().__init__()
        vit = dense.backbone
        dim = int(vit.embed_dim)
        gh, gw = (int(g) for g in vit.patch_embed.grid_size)
        patch = int(vit.patch_embed.patch_size[0])
        if patch not in (4, 8, 16):
            raise VitkitError(
                f"vit-comer: the CNN branch follows a 4, 8 or 16 px patch; the model's is {patch} px"
            )
        if gh % 2 or gw % 2:
            raise VitkitError(
                f"vit-comer: the patch grid must have even sides (its 1/2 level); it is {gh}x{gw}"
            )
        depth = len(vit.blocks)  # four interactions, each around a quarter of the blocks (some none when < 4)
        heads = cfg.deform_heads or next(h for h in (6, 4, 2, 1) if dim % h == 0)
        in_chans = int(vit.patch_embed.proj.in_channels)
        self.shapes = [(2 * gh, 2 * gw), (gh, gw), (gh // 2, gw // 2)]  # c2, c3, c4 (c3: the token grid)
        self.groups = [list(range(round(i * depth / 4), round((i + 1) * depth / 4))) for i in range(4)]
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = CNNBranch(in_chans, cfg.conv_inplane, dim, patch)
        self.interactions = nn.Sequential(
            *(CTIBlock(dim, cfg, heads, extra=cfg.extra_cti and i == 3) for i in range(4))
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))
        for part in (self.up, self.spm, self.interactions):
            part.apply(_official_init)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)  # std 1, as the code
        # the head's pyramid: for each of its levels, the CoMer level of the nearest stride
        natural = [(4 * gh, 4 * gw), (2 * gh, 2 * gw), (gh, gw), (gh // 2, gw // 2)]
        targets = list(dense.pyramid_sizes())
        sources = [min(range(4), key=lambda j: abs(math.log(natural[j][0] / h))) for h, _ in targets]
        # fixed per level (plain ints, so the ONNX trace holds constants): (source, pool kernel or None, size)
        self.resize: list[tuple[int, tuple[int, int] | None, tuple[int, int]]] = []
        for j, size in zip(sources, targets):
            (h, w), pool = natural[j], None
            if (h, w) != size and h > size[0] and h % size[0] == 0 and w % size[1] == 0:
                pool = (h // size[0], w // size[1])
            self.resize.append((j, pool, (int(size[0]), int(size[1]))))
        channels = int(dense.config.channels) if dense.config.head == "upernet" else dim
        self.proj = (
            nn.ModuleList(nn.Conv2d(dim, channels, 1) for _ in self.targets) if channels != dim else None
        )

    def forward(self, vit: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        c1, c2, c3, c4 = self.spm(x)
        c = _join([c2 + self.level_embed[0, :, None, None], c3 + self.level_embed[1, :, None, None],
                   c4 + self.level_embed[2, :, None, None]])  # fmt: skip
        ref = reference_points(self.shapes, x.device)
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        npt = int(getattr(vit, "num_prefix_tokens", 0))
        gh, gw = self.shapes[1]
        outs = []
        for group, layer in zip(self.groups, self.interactions):
            t, c = layer(t, c, [vit.blocks[j] for j in group], npt, ref, self.shapes)
            outs.append(t[:, npt:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
        c2, c3, c4 = _split(c, self.shapes)
        c1 = self.up(c2) + c1
        x1 = F.interpolate(outs[0], scale_factor=4, mode="bilinear", align_corners=False)
        x2 = F.interpolate(outs[1], scale_factor=2, mode="bilinear", align_corners=False)
        x4 = F.interpolate(outs[3], scale_factor=0.5, mode="bilinear", align_corners=False)
        levels = [self.norm1(c1 + x1), self.norm2(c2 + x2), self.norm3(c3 + outs[2]), self.norm4(c4 + x4)]
        out = []
        for j, pool, size in self.resize:
            y = levels[j]
            if pool is not None:
                y = F.avg_pool2d(y, pool)
            elif tuple(y.shape[-2:]) != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out.append(y)
        return out if self.proj is None else [p(o) for p, o in zip(self.proj, out)]


# -- the transform ----------------------------------------------------------------------------------
def apply_vit_comer(model: nn.Module, config: ViTCoMerConfig | dict[str, Any] | None = None) -> nn.Module:
    """Give a dense model (a ViT under a segmentation head) ViT-CoMer's pyramid."""
    from vitkit.models.dense import DenseModel

    cfg = parse_config(ViTCoMerConfig, config if config is not None else {}, "vit-comer")
    if (
        not isinstance(model, DenseModel)
        or model.config.head == "changevit"
        or model.config.task != "segmentation"
    ):
        raise VitkitError(
            "vit-comer builds the feature pyramid of a segmentation head: train with --task segmentation "
            "(--head upernet or linear)"
        )
    if model.pyramid_encoder is not None:
        raise VitkitError("vit-comer: the model's pyramid is already replaced by a transform")
    model.pyramid_encoder = ViTCoMerEncoder(model, cfg)
    model.neck = nn.Identity()  # the simple pyramid is not used any more
    record_transform(model, "vit-comer", cfg.model_dump())
    return model


def _train(options: dict[str, str]) -> TrainTransform:
    cfg = parse_config(ViTCoMerConfig, options, "vit-comer")
    return TrainTransform(apply=lambda m: apply_vit_comer(m, cfg))


register(
    Technique(
        name="vit-comer",
        summary="ViT-CoMer's CNN branch and CNN-Transformer interactions build a dense model's pyramid",
        paper='Xia et al., "ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction for '
        'Dense Predictions" (2024)',
        replay=apply_vit_comer,
        export=AS_IS,
        config=ViTCoMerConfig,
        quantize="its deformable attention and convolutions have no quantized form in vitkit yet",
        train=_train,
        family="architecture",
        verb="vitkit train --task segmentation --transform vit-comer:conv_inplane=16",
        applies_to="dense",
    )
)

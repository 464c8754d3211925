"""PVC — Sun et al., "LLaVA-UHD v3: Progressive Visual Compression for Efficient Native-Resolution
Encoding in MLLMs" (arXiv 2511.21150, 2025): a finer tokenization of a trained ViT (Refined Patch
Embedding, RPE) and windowed token compression (WTC) inside it, as a token-reduction method beside
EViT and ToMe. Read from thunlp/LLaVA-UHD @13981b5 (``modeling_moonvit.py``: ``WTC`` and
``MoonVitEncoderLayer``); the LLM side is out of scope.

- **RPE** (``patch``): the patch embedding runs at a smaller patch, its kernel resized by timm's
  ``resample_patch_embed`` (FlexiViT's pseudo-inverse resize) and the position embedding resampled
  to the finer grid (timm's ``resample_abs_pos_embed``). No RPE code is in the official repository
  (the paper describes it; it appears to be configured there): this is our reading, after FlexiViT.
- **WTC** (``at``, ``mode``): after each listed block (the whole block, attention and MLP, as the
  official layer calls its merger last), the patch tokens' grid is merged in 2x2 windows; prefix
  tokens (cls, dist, registers) pass unchanged. ``avg``: the mean of the window (the code's
  ``avg_pooling``). ``mlp``: the code's ``m_pooling``, ``w = softmax_window(MLP([x_j ; mean]))``
  per channel (Linear 2C->C, GELU, Linear C->C; the code's 16-head reshape does not change a
  per-channel softmax) and ``sum_j w_j * x_j``. Differences on purpose: the last Linear starts at
  zero, so an untrained merger *is* the average (the code creates a ``zero_init_fc`` and never uses
  it); an odd grid side is padded by repeating the last row/column (the code's rearrange fails on
  it); the grid must be square (the code packs per-image shapes; timm's ViT has one grid).
- Token count: each WTC quarters the patch tokens (the code's ``down_sample_ratio =
  len(merger_layer_index)**2`` per side is only right for two merges: the count here is 4 ** merges).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from vitkit.compress._blocks import WrappedBlock, refuse_attention_mask, transformer_blocks
from vitkit.errors import VitkitError
from vitkit.models import num_prefix_tokens, record_transform
from vitkit.registry import AS_IS, Technique, register


class PVCConfig(BaseModel):
    """``vitkit reduce-tokens RUN --method pvc``: finer patches, then 2x2 merges after some blocks."""

    model_config = ConfigDict(extra="forbid")

    patch: int | None = Field(None, ge=1, description="RPE: run the patch embedding at this patch size")
    at: list[int] = Field(default_factory=list, description="WTC: merge 2x2 windows after these blocks")
    mode: Literal["avg", "mlp"] = Field("avg", description="WTC: window mean, or the content-aware MLP")

    @field_validator("at")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError("at: distinct block indices >= 0")
        return sorted(v)


def refine_patch_embed(model: nn.Module, patch: int) -> None:
    """RPE: the patch embedding at ``patch`` px (kernel resized by FlexiViT's pseudo-inverse resize,
    timm's ``resample_patch_embed``) and the position embedding resampled to the new grid."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d) or pe.img_size is None:
        raise VitkitError("PVC patch: needs a timm ViT whose patch embedding is one convolution")
    h, w = pe.img_size
    if h % patch or w % patch:
        raise VitkitError(f"PVC patch {patch}: does not divide the input size {h}x{w}")
    old_grid = tuple(pe.grid_size)
    new = nn.Conv2d(proj.in_channels, proj.out_channels, patch, stride=patch, bias=proj.bias is not None)
    with torch.no_grad():
        new.weight.copy_(resample_patch_embed(proj.weight, [patch, patch]))
        if proj.bias is not None:
            new.bias.copy_(proj.bias)
    pe.proj = new
    pe.patch_size = (patch, patch)
    pe.grid_size = (h // patch, w // patch)
    pe.num_patches = pe.grid_size[0] * pe.grid_size[1]
    pos = getattr(model, "pos_embed", None)
    if isinstance(pos, nn.Parameter):
        prefix = 0 if getattr(model, "no_embed_class", False) else num_prefix_tokens(model)
        resampled = resample_abs_pos_embed(
            pos.data, new_size=list(pe.grid_size), old_size=list(old_grid), num_prefix_tokens=prefix
        )
        model.pos_embed = nn.Parameter(resampled)


def window_merge(x: torch.Tensor, prefix: int, merger: nn.Module | None = None) -> torch.Tensor:
    """2x2 windows of the (square) patch grid of ``x`` (B, P + h*h, C) merged into one token each:
    the mean, or with ``merger`` the content-aware weighted sum (module docstring)."""
    pre, patches = x[:, :prefix], x[:, prefix:]
    B, N, C = patches.shape
    side = math.isqrt(N)
    if side * side != N:
        raise VitkitError(f"PVC: {N} patch tokens are not a square grid")
    g = patches.reshape(B, side, side, C)
    if side % 2:  # repeat the last row and column (the code's 2x2 rearrange fails on an odd side)
        g = torch.cat([g, g[:, -1:]], 1)
        g = torch.cat([g, g[:, :, -1:]], 2)
    s = g.shape[1] // 2
    win = g.reshape(B, s, 2, s, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, s * s, 4, C)
    mean = win.mean(2, keepdim=True)
    if merger is None:
        out = mean.squeeze(2)
    else:
        logits = merger(torch.cat([win, mean.expand_as(win)], -1))
        out = (win * logits.softmax(2)).sum(2)
    return torch.cat([pre, out], 1)


class WTCMerger(nn.Sequential):
    """m_pooling's MLP: Linear(2C -> C), GELU, Linear(C -> C), the last one zero (start = the mean)."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.zeros_(self[2].weight)
        nn.init.zeros_(self[2].bias)


class WTCBlock(WrappedBlock):
    """A timm Block followed by the 2x2 window merge of its output's patch tokens."""

    def __init__(self, block: nn.Module, prefix: int, mode: str):
        super().__init__(block)
        self.prefix = prefix
        dim = block.norm1.weight.shape[0] if hasattr(block.norm1, "weight") else block.mlp.fc1.in_features
        self.merger = WTCMerger(dim) if mode == "mlp" else None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        refuse_attention_mask(attn_mask, is_causal, "PVC")
        x = self.mlp_residual(self.attention_residual(x))
        return window_merge(x, self.prefix, self.merger)


def apply_pvc(model: nn.Module, cfg: PVCConfig | dict | None = None) -> nn.Module:
    """RPE (``patch``) and WTC blocks (``at``) on a timm ViT, in place; records ``pvc``."""
    cfg = PVCConfig(**cfg) if isinstance(cfg, dict) else (cfg or PVCConfig())
    if cfg.patch is None and not cfg.at:
        raise VitkitError("PVC: give a patch size (RPE), blocks to merge after (WTC), or both")
    if getattr(model, "dynamic_img_size", False) and cfg.at:
        raise VitkitError("PVC: window merging needs a fixed input size (the model has dynamic_img_size)")
    blocks = transformer_blocks(model, "PVC")
    if cfg.at and cfg.at[-1] >= len(blocks):
        raise VitkitError(f"PVC at: block {cfg.at[-1]} does not exist (the model has {len(blocks)})")
    if cfg.patch is not None:
        refine_patch_embed(model, cfg.patch)
    side = model.patch_embed.grid_size[0]
    if cfg.at and model.patch_embed.grid_size[0] != model.patch_embed.grid_size[1]:
        raise VitkitError("PVC: window merging needs a square patch grid")
    for i in cfg.at:
        if side < 2:
            raise VitkitError(f"PVC at: block {i} would merge a 1x1 grid (too many merges for this input)")
        side = (side + 1) // 2
    P = num_prefix_tokens(model)
    for i in cfg.at:
        blocks[i] = WTCBlock(blocks[i], P, cfg.mode)
    record_transform(model, "pvc", cfg.model_dump())
    return model


def replay_pvc(model: nn.Module, config: dict) -> nn.Module:
    return apply_pvc(model, PVCConfig(**config))


def pvc_tokens(model: nn.Module) -> int:
    """Patch tokens after the last block of a PVC model (for reports)."""
    side = model.patch_embed.grid_size[0]
    for blk in model.blocks:
        if isinstance(blk, WTCBlock):
            side = (side + 1) // 2
    return side * side


register(
    Technique(
        name="pvc",
        summary="finer patches (RPE), then 2x2 window merges of the tokens after chosen blocks (WTC)",
        paper='Sun et al., "LLaVA-UHD v3: Progressive Visual Compression ..." (2025)',
        config=PVCConfig,
        replay=replay_pvc,
        export=AS_IS,
        family="compress",
        verb="vitkit reduce-tokens RUN --method pvc --patch 2 --at 1",
    )
)

"""A compressed convolutional patch stem (CI2P-ViT style): the transformer sees c² times fewer tokens.

Paper: Zhao & Sun, "Compress image to patches for Vision Transformer" (CI2P-ViT, arXiv 2502.10120,
2025). CI2P replaces ViT's patch embedding by a CompressAI image-compression encoder (frozen,
pretrained) followed by convolutions that turn its latent into patches; with ViT-B/16 the
self-attention sees 49 instead of 196 tokens (4x fewer).

What it changes here: ``model.patch_embed`` (timm ``PatchEmbed``, exact type) becomes timm's
``HybridEmbed`` whose backbone is a CompressAI-style analysis transform: 5x5 stride-2 convolutions
with GDN between them, down-sampling by the original patch size (an odd factor, e.g. patch 14's 7,
is one k x k stride-k convolution), then HybridEmbed's projection, a ``c x c`` stride-``c``
convolution to the embedding width (CI2P's "patch reshape"). Patch 16, ``compression=2`` is
CompressAI's four-conv ``g_a`` plus one 2x2 patch conv: ViT-B/16's 14x14 grid becomes 7x7. The
absolute position embedding is resampled to the new grid with timm's ``resample_abs_pos_embed``;
prefix tokens (cls, dist, registers) keep theirs.

Simplified (no weights can be downloaded here, and CompressAI is not a dependency): the encoder is
trained from scratch with the ViT instead of being a frozen pretrained compression model, and GDN's
non-negativity uses ``abs`` instead of CompressAI's re-parametrisation. The image side must be
divisible by ``patch_size * compression``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.layers import HybridEmbed, PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import record_transform
from vitkit.registry import AS_IS, Technique, TrainTransform, parse_config, register


class StemConfig(BaseModel):
    """Options of :func:`apply_stem` (``--transform stem:compression=2,channels=32``)."""

    model_config = ConfigDict(extra="forbid")

    compression: int = Field(
        2, ge=2, le=16, description="extra down-sampling per side: c² times fewer tokens"
    )
    channels: int | None = Field(None, ge=1, description="encoder width (default: embed_dim // 2)")


class GDN(nn.Module):
    """Generalized divisive normalization (Ballé et al., 2016): y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²)."""

    def __init__(self, channels: int, gamma_init: float = 0.1, beta_min: float = 1e-6):
        super().__init__()
        self.beta_min = beta_min
        self.beta = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(gamma_init * torch.eye(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.abs()[:, :, None, None]
        norm = F.conv2d(x * x, gamma, self.beta.abs() + self.beta_min)
        return x * torch.rsqrt(norm)


def _factor(patch: int) -> tuple[int, int]:
    """patch = 2**k * odd -> (k, odd)."""
    k = 0
    while patch % 2 == 0 and patch > 1:
        patch //= 2
        k += 1
    return k, patch


def compression_encoder(in_chans: int, channels: int, patch: int) -> nn.Sequential:
    """CompressAI-style analysis transform down-sampling by ``patch``: conv5x5/2 (GDN conv5x5/2)* ..."""
    k, odd = _factor(patch)
    strides = [2] * k + ([odd] if odd > 1 else [])
    layers: list[nn.Module] = []
    c_in = in_chans
    for i, s in enumerate(strides):
        kernel, pad = (5, 2) if s == 2 else (s, 0)
        layers.append(nn.Conv2d(c_in, channels, kernel, stride=s, padding=pad))
        if i < len(strides) - 1:  # like CompressAI's g_a: no GDN after the last convolution
            layers.append(GDN(channels))
        c_in = channels
    if not layers:  # patch 1: nothing to compress before the patch convolution
        layers.append(nn.Identity())
    return nn.Sequential(*layers)


def apply_stem(model: nn.Module, cfg: StemConfig | dict | None = None) -> nn.Module:
    """Replace a timm ViT's ``PatchEmbed`` by a compressed convolutional stem, in place; returns it.

    The transformer then sees ``compression²`` times fewer patch tokens; the position embedding is
    resampled. Raises :class:`VitkitError` for models without timm's ``PatchEmbed`` (CNNs, DHVT's
    SOPE, an already compressed stem) or a compression that does not divide the image size.
    """
    cfg = parse_config(StemConfig, cfg, "stem")
    pe = getattr(model, "patch_embed", None)
    if not isinstance(model, VisionTransformer) or type(pe) is not PatchEmbed:
        got = type(pe).__name__ if pe is not None else "none"
        raise VitkitError(
            f"stem: {type(model).__name__} (patch embedding: {got}) cannot take a compressed stem; "
            "it replaces timm's PatchEmbed in a timm VisionTransformer"
        )
    ph, pw = pe.patch_size
    if ph != pw:
        raise VitkitError(f"stem: needs square patches, got {pe.patch_size}")
    stride = ph * cfg.compression
    h, w = pe.img_size
    if h % stride or w % stride:
        raise VitkitError(
            f"stem: compression {cfg.compression} does not divide the image: {h}x{w} px is not a multiple "
            f"of patch {ph} x compression {cfg.compression} = {stride} px"
        )
    embed_dim = pe.proj.out_channels
    channels = cfg.channels or max(embed_dim // 2, 8)
    old_grid = tuple(pe.grid_size)
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    param = pe.proj.weight
    stem = HybridEmbed(
        compression_encoder(pe.proj.in_channels, channels, ph),
        img_size=(h, w),
        patch_size=cfg.compression,
        in_chans=pe.proj.in_channels,
        embed_dim=embed_dim,
        output_fmt="NHWC" if dynamic else None,
        strict_img_size=not dynamic,
    ).to(device=param.device, dtype=param.dtype)
    model.patch_embed = stem
    if model.pos_embed is not None:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        with torch.no_grad():
            new = resample_abs_pos_embed(
                model.pos_embed.detach(), list(stem.grid_size), list(old_grid), num_prefix_tokens=prefix
            )
        model.pos_embed = nn.Parameter(new.contiguous(), requires_grad=model.pos_embed.requires_grad)
    record_transform(model, "stem", {**cfg.model_dump(), "channels": channels})
    return model


def stem_token_count(img_size: int, patch_size: int, compression: int) -> int:
    """Patch tokens after :func:`apply_stem` on a square image."""
    return (img_size // (patch_size * compression)) ** 2


def replay_stem(model: nn.Module, config: dict) -> nn.Module:
    """``vitkit.load``: the same stem (its weights and the position embedding come from safetensors)."""
    return apply_stem(model, config)


def train_transform(options: dict[str, str]) -> TrainTransform:
    """``vitkit train --transform stem:compression=2``."""
    cfg = parse_config(StemConfig, options, "stem")
    return TrainTransform(apply=lambda model: apply_stem(model, cfg))


register(
    Technique(
        name="stem",
        summary="a compressing convolutional patch stem: c² times fewer tokens",
        paper='Zhao & Sun, "Compress image to patches for Vision Transformer" (2025)',
        config=StemConfig,
        replay=replay_stem,
        export=AS_IS,
        train=train_transform,
        family="architecture",
        verb="vitkit train --transform stem:compression=2",
    )
)

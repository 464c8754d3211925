"""Hi-End-MAE: "Hi-End-MAE: Hierarchical encoder-driven masked autoencoders are stronger vision learners
for medical image segmentation" (Tang et al., Medical Image Analysis 2025; arXiv 2502.08347).

What it changes over MAE: the decoder does not see the last encoder layer only. Its queries (the
final encoder output of the visible tokens, projected, plus mask tokens and the decoder position
embedding: MAE's decoder input) pass MAE's self-attention blocks, then one *cross-attention block*
per tapped encoder layer, deepest first: self-attention, cross-attention whose keys and values are
that layer's visible tokens (prefix tokens included) through their own ``Linear(D -> Dd)``, MLP.
So the reconstruction of every masked patch is driven by shallower and shallower encoder features,
and the encoder is pushed to keep useful local detail in its intermediate layers (what a dense
fine-tuning task reads).

Faithful to FengheTan9/Hi-End-MAE@b0df9c6 (``hi_end_mae.py``, ``networks/vit.py``), checked against
a re-implementation of its decoder in ``tests/pretrain/hiend_reference.py`` to 1e-5:
* taps: the official ViT-B/12 feeds ``hidden_states[9]``, ``[6]``, ``[3]`` (the outputs of blocks 10,
  7 and 4, 1-based) to three cross blocks, after 2 self-attention blocks; ``levels`` are those 0-based
  block indices, and the default for a depth-``D`` encoder is ``D*3//4, D*2//4, D//4`` (= 9, 6, 3 for
  D = 12) without the last block (it *is* the final output) and without repeats;
* intermediate features are used as they are (no LayerNorm, whatever the official docstring says);
  only the final output passes the encoder's last norm;
* one projection per level and one for the final output (``encoder_to_decoder``), a decoder
  ``LayerNorm(eps=1e-6)`` everywhere, ``qkv_bias=True`` in self- and cross-attention;
* the loss: mean squared error over the masked patches against ``LayerNorm(no affine, eps=1e-6)``
  of each raw patch (biased variance; MAE's ``norm_pix_loss`` uses the unbiased one).

Our choices (say so): 2-D instead of the paper's 3-D CT volumes (patchify and the sin-cos position
embedding are MAE's 2-D ones, over a timm ViT encoder; the 3-D code orders the patch vector
``[ph, pw, pd, c]``, 2-D MAE ``[ph, pw, c]``); the decoder tokens are unshuffled back to grid order
before the decoder (the official code keeps the shuffled order and slices the masked tail: the same
result, since attention is permutation-equivariant and the position embedding travels with each
token); the decoder's projections are initialised as MAE's (xavier-uniform, zero bias; the official
``encoder_to_decoder`` keeps PyTorch's default bias). Defaults are light for CPU scale as vitkit's
MAE: decoder width = the encoder's (≤ 512; the paper: 384 for ViT-B), 2 self-attention blocks (as
the paper), 32-dim heads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from vitkit.errors import VitkitError
from vitkit.pretrain.mae import MAEConfig, MaskedAutoencoder


class HiEndMAEConfig(MAEConfig):
    """MAE's settings plus the encoder layers the decoder's cross-attention blocks read."""

    levels: list[int] | None = Field(
        None,
        description="0-based encoder blocks whose outputs feed the cross-attention blocks, deepest "
        "first [default: depth*3//4, depth//2, depth//4 without the last block]",
    )

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError(f"must be distinct block indices ≥ 0, at least one; got {v}")
        return v

    @classmethod
    def build(cls, source: str = "hi-end-mae", **values: Any) -> HiEndMAEConfig:
        return super().build(source, **values)  # type: ignore[return-value]

    def build_model(self, encoder: nn.Module, *, init_encoder: bool = False) -> HiEndMAE:
        return HiEndMAE(encoder, self, init_encoder=init_encoder)


def default_levels(depth: int) -> list[int]:
    """The official taps (blocks 9, 6, 3 of 12, 0-based) scaled to ``depth`` blocks, deepest first;
    the last block is left out (its output is the final one) and so are repeats."""
    out: list[int] = []
    for k in (3, 2, 1):
        i = depth * k // 4
        if i < depth - 1 and i not in out:
            out.append(i)
    return out


class CrossAttention(nn.Module):
    """Queries from the decoder tokens, keys and values from encoder features (official
    ``networks/vit.py: CrossAttention``: ``q``, ``kv`` and ``proj`` linears, SDPA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise VitkitError(f"hi-end-mae: decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(y).reshape(b, y.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttentionBlock(nn.Module):
    """Self-attention, cross-attention to one encoder level, MLP; pre-norm residuals (official
    ``CrossAttentionBlock`` with ``self_attn=True``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer: Any):
        super().__init__()
        self.norm0 = norm_layer(dim)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm1 = norm_layer(dim)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class HiEndMAE(MaskedAutoencoder):
    """A timm ViT encoder plus Hi-End-MAE's encoder-driven decoder. ``forward(imgs) -> (loss, pred,
    mask)`` as :class:`MaskedAutoencoder`; ``level_embed[i]`` projects ``levels[i]``'s features."""

    cfg: HiEndMAEConfig  # the decoder norm: MAE's LayerNorm(eps=1e-6), as the official decoder's
    # the target: official ``LayerNorm(no affine, eps=1e-6)`` of each raw patch, i.e. the biased variance
    unbiased_target_var = False

    def __init__(self, encoder: nn.Module, cfg: HiEndMAEConfig | None = None, *, init_encoder: bool = False):
        cfg = cfg or HiEndMAEConfig()
        depth = len(getattr(encoder, "blocks", ()))
        levels = list(cfg.levels) if cfg.levels is not None else default_levels(depth)
        if not levels:
            raise VitkitError(
                f"hi-end-mae: the encoder has {depth} block(s); it needs at least 2 so that an "
                "intermediate layer can drive the decoder"
            )
        bad = [i for i in levels if i >= depth]
        if bad:
            raise VitkitError(
                f"hi-end-mae: levels {bad} are not blocks of a {depth}-block encoder (0..{depth - 1})"
            )
        self.levels = levels
        super().__init__(encoder, cfg, init_encoder=init_encoder)

    def _build_decoder_extras(self, embed_dim: int, dec_dim: int, heads: int) -> None:
        self.level_embed = nn.ModuleList(nn.Linear(embed_dim, dec_dim) for _ in self.levels)
        self.cross_blocks = nn.ModuleList(
            CrossAttentionBlock(dec_dim, heads, self.cfg.decoder_mlp_ratio, self.norm_layer)
            for _ in self.levels
        )

    def decoder_modules(self) -> list[nn.Module]:
        return [*super().decoder_modules(), *self.level_embed, *self.cross_blocks]

    def hidden_to_keep(self) -> dict[int, Any]:
        return dict.fromkeys(self.levels)

    def forward_decoder(
        self, x: torch.Tensor, ids_restore: torch.Tensor, hidden: dict[int, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if hidden is None or any(hidden.get(i) is None for i in self.levels):
            raise ValueError("hi-end-mae: forward_decoder needs the encoder's hidden states of every level")
        x = self.decoder_tokens(x, ids_restore)
        for blk in self.decoder_blocks:
            x = blk(x)
        for level, embed, blk in zip(self.levels, self.level_embed, self.cross_blocks):
            x = blk(x, embed(hidden[level]))
        return self.decoder_head(x)

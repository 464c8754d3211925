"""L²ViT linear attention — Zheng, "Linear Attention Resurrection in Vision Transformer" (L²ViT), 2025.

Changes the model: the chosen blocks' :class:`~vitkit.models.VitkitAttention` becomes a
:class:`LinearAttention` (same ``qkv``/``proj``/q-k-norm parameters, plus a per-head temperature and a
local concentration module): ``out_i = τ_h · φ(q_i)ᵀ(Σ_j φ(k_j) v_jᵀ) / max(φ(q_i)·Σ_j φ(k_j), 100)``
with φ = ReLU, computed keys-and-values first, so the cost grows linearly with the number of tokens
(O(N·d²) instead of O(N²·d)). Trainable through the one loop like any model.

Faithful to ChuanyangZheng/L2ViT (``classification/models/l2vit.py: LinearAttention, LCM``): ReLU
feature map, the clamp of the normaliser at 100 (their "equivalent" qk-first code in the comments
clamps at 1 and scales differently: not equivalent, not used), τ_h learnable with init
``head_dim^-0.5``, the LCM = depthwise 7×7 conv → GELU → BatchNorm → depthwise 7×7 conv on the patch
grid. Our choices: L²ViT is a hierarchical model alternating window attention (LWA) and linear
global attention (LGA) blocks with conditional position encodings; here only the global attention
of a plain timm ViT is swapped (no windows, no CPE, no stages). The LCM sits inside the attention
branch, on the attention output (``y = a + LCM(a)`` on patch tokens, prefix tokens untouched),
instead of as its own residual sub-block with a third LayerNorm, so the swap stays within the
attention module; its last conv starts at zero so a swapped pretrained model starts from plain
linear attention. A probability tap gets the equivalent explicit attention map
``φ(Q)φ(K)ᵀ·τ / max(rowsum, 100)`` (O(N²), only when asked for); additive biases and logit hooks do
not apply to linear attention and raise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.compress._blocks import parse_int_list
from vitkit.errors import VitkitError
from vitkit.models import (
    AttentionState,
    VitkitAttention,
    attention_modules,
    num_prefix_tokens,
    record_transform,
)
from vitkit.registry import AS_IS, Technique, TrainTransform, parse_config, register

DENOM_CLAMP = 100.0  # L2ViT's clamp on the normaliser ("makes training stable", per their code)


class LocalConcentration(nn.Module):
    """L²ViT's LCM on a (B, N, C) token grid: dwconv k×k → GELU → BN → dwconv k×k."""

    def __init__(self, dim: int, grid: tuple[int, int], kernel: int = 7):
        super().__init__()
        self.grid = tuple(grid)
        self.conv1 = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, C = x.shape
        y = x.transpose(1, 2).reshape(B, C, *self.grid)
        y = self.conv2(self.bn(self.act(self.conv1(y))))
        return y.flatten(2).transpose(1, 2)


class LinearAttention(VitkitAttention):
    """ReLU linear attention with the L²ViT normaliser and a local concentration module."""

    def __init__(self, source: VitkitAttention, grid: tuple[int, int], num_prefix: int, lcm_kernel: int = 7):
        super().__init__(source)
        self.num_prefix = int(num_prefix)
        w = self.qkv.weight
        self.temperature = nn.Parameter(
            torch.full((self.num_heads, 1, 1), self.head_dim**-0.5, device=w.device, dtype=w.dtype)
        )
        dim = self.proj.out_features
        self.lcm = LocalConcentration(dim, grid, lcm_kernel).to(w.device, w.dtype) if lcm_kernel else None
        self.train(source.training)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal or self._bias_hooks or self._logit_hooks:
            raise VitkitError(
                "linear attention has no attention logits: masks, biases and logit hooks do not apply"
            )
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self._taps:
            probs = None
            if any(needs for _, needs in self._taps.values()):
                probs = linear_attention_map(q, k, self.temperature)
            state = AttentionState(self, q, k, v, probs)
            for fn, _ in self._taps.values():
                fn(state)
        out = linear_attention(q, k, v, self.temperature)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        out = self.proj(out)
        if self.lcm is not None:
            P = self.num_prefix
            out = torch.cat([out[:, :P], out[:, P:] + self.lcm(out[:, P:])], dim=1)
        return self.proj_drop(out)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, linear (ReLU, clamp {DENOM_CLAMP:g})"


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """Keys-and-values first: (B, H, N, D) → (B, H, N, D) in O(N·D²)."""
    q, k = F.relu(q), F.relu(k)
    kv = (k.transpose(-2, -1) @ v) * temperature  # (B, H, D, D)
    denom = (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)).clamp_min(DENOM_CLAMP)  # (B, H, N, 1)
    return (q @ kv) / denom


def linear_attention_map(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The equivalent explicit (B, H, N, N) map: ``φ(Q)φ(K)ᵀ·τ / max(rowsum, 100)`` (O(N²))."""
    a = F.relu(q) @ F.relu(k).transpose(-2, -1)
    return a * temperature / a.sum(dim=-1, keepdim=True).clamp_min(DENOM_CLAMP)


@dataclass
class LinearAttentionConfig:
    """``blocks``: 0-based indices of the blocks whose attention becomes linear (default: all).
    ``lcm_kernel``: kernel of the local concentration module (0 = no LCM)."""

    blocks: list[int] = field(default_factory=list)
    lcm_kernel: int = 7

    def to_dict(self) -> dict:
        return asdict(self)


def apply_linear_attention(model: nn.Module, cfg: LinearAttentionConfig | dict | None = None) -> nn.Module:
    """Swap the chosen blocks' attention for :class:`LinearAttention` (in place); records ``linear_attention``."""
    cfg = LinearAttentionConfig(**cfg) if isinstance(cfg, dict) else (cfg or LinearAttentionConfig())
    mods = attention_modules(model)
    if not mods:
        raise VitkitError(f"{type(model).__name__} has no vitkit attention modules to make linear")
    chosen = parse_int_list(cfg.blocks, "linear attention blocks") or list(range(len(mods)))
    bad = [i for i in chosen if not 0 <= i < len(mods)]
    if bad:
        raise VitkitError(
            f"linear attention blocks {bad}: the model has {len(mods)} attention layers (0..{len(mods) - 1})"
        )
    done = [i for i in chosen if type(mods[i]) is not VitkitAttention]
    if done:
        raise VitkitError(
            f"linear attention blocks {done}: already {type(mods[done[0]]).__name__}, not the softmax attention"
        )
    if cfg.lcm_kernel < 0 or (cfg.lcm_kernel and cfg.lcm_kernel % 2 == 0):
        raise VitkitError(f"linear attention lcm_kernel must be 0 or an odd size, got {cfg.lcm_kernel}")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if cfg.lcm_kernel and not grid:
        raise VitkitError(
            "the local concentration module needs a patch grid (patch_embed.grid_size); use lcm_kernel=0"
        )
    targets = {id(mods[i]) for i in chosen}
    P = num_prefix_tokens(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, name, LinearAttention(child, tuple(grid or (0, 0)), P, cfg.lcm_kernel))
    cfg.blocks = sorted(chosen)
    record_transform(model, "linear_attention", cfg.to_dict())
    return model


def replay_linear_attention(model: nn.Module, config: dict) -> nn.Module:
    return apply_linear_attention(model, LinearAttentionConfig(**config))


def train_transform(options: dict[str, str]) -> TrainTransform:
    """``vitkit train --transform linear_attention`` (options as ``key=value``): applied before training."""
    cfg = parse_config(LinearAttentionConfig, options, "linear_attention")
    return TrainTransform(apply=lambda model: apply_linear_attention(model, cfg))


register(
    Technique(
        name="linear_attention",
        summary="ReLU linear attention with a local concentration module: cost linear in tokens",
        paper='Zheng, "Linear Attention Resurrection in Vision Transformer" (2025)',
        config=LinearAttentionConfig,
        replay=replay_linear_attention,
        export=AS_IS,
        # the quantization points sit on q·kᵀ and softmax, which this attention never computes
        quantize="its attention computes relu(q)·(relu(k)ᵀv) without the q·kᵀ product and softmax "
        "the attention quantizers sit on",
        family="compress",
        verb="vitkit train --transform linear_attention",
        train=train_transform,
    )
)

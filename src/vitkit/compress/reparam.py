"""RePaViT — Xu et al., "RePaViT: Scalable Vision Transformer Acceleration via Structural
Reparameterization on Feedforward Network Layers", ICML 2025.

Changes the model, in two steps:

1. :func:`apply_repavit` (for training): in every block the FFN becomes a *channel-idle* FFN —
   the LayerNorm before it (``norm2``) becomes a BatchNorm over tokens, GELU acts only on the first
   ``a = ceil(H·(1-θ))`` hidden channels and the other ``θ·H`` channels pass through unchanged
   ("idle"), and a BatchNorm follows the activation: ``y = x + ls2(fc2(BN2(φ_a(fc1(BN1(x))))))``.
2. :func:`reparameterize` (for inference, eval mode): BN1 and BN2 (running statistics) fold into
   fc1 and fc2, LayerScale folds into fc2, and the idle path collapses into one C×C linear:
   ``y = x + W_lin·x + b_lin + W2[:, act]·GELU(W1[act]·x + b1[act])``. FFN MACs per token drop from
   ``2HC`` to ``C² + 2aC`` (H = 4C, θ = 0.75: 8C² → 3C²). Exact in real arithmetic (tested in float64).

Faithful to Ackesnal/RePaViT (``repavit.py``: ``feature_norm='BatchNorm'``, BN1 on the FFN input,
BN2 on the hidden features after the partial activation, attention keeps its LayerNorm; the residual
stays outside, in timm's Block). Our choices: the same θ for every block (the paper's ``linear``
per-layer heuristic is not implemented); the transform starts from a timm ViT's own fc1/fc2 (so it
can also be applied to a pretrained model, though the paper trains with BN from scratch: a LayerNorm
model cannot be reparameterized post hoc and needs training after the swap).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from timm.layers import LayerScale, Mlp
from torch import nn

from vitkit.compress._blocks import all_blocks
from vitkit.errors import VitkitError
from vitkit.models import get_manifest, record_transform
from vitkit.registry import AS_IS, Technique, TrainTransform, parse_config, register


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of (B, N, C) tokens (statistics over batch and tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ChannelIdleMlp(nn.Module):
    """``fc2(BN2(φ_a(fc1(x))))`` with GELU on the first ``act_channels`` hidden channels only."""

    def __init__(
        self, fc1: nn.Linear, fc2: nn.Linear, act_channels: int, act_layer: type[nn.Module] = nn.GELU
    ):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.act_channels = int(act_channels)
        self.act = act_layer()
        self.norm = TokenBatchNorm(fc1.out_features).to(fc1.weight.device, fc1.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        a = self.act_channels
        h = torch.cat([self.act(h[..., :a]), h[..., a:]], dim=-1)
        return self.fc2(self.norm(h))

    def extra_repr(self) -> str:
        return f"act_channels={self.act_channels}/{self.fc1.out_features}"


class ReparamMlp(nn.Module):
    """The inference form: ``lin(x) + fc2(GELU(fc1(x)))`` with ``fc1`` only ``a`` channels wide."""

    def __init__(self, dim: int, act_channels: int, bias: bool = True, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=True)
        self.fc1 = nn.Linear(dim, act_channels, bias=bias) if act_channels else None
        self.act = act_layer()
        self.fc2 = nn.Linear(act_channels, dim, bias=False) if act_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.fc1 is not None:
            y = y + self.fc2(self.act(self.fc1(x)))
        return y


@dataclass
class RePaViTConfig:
    """``idle``: θ, the fraction of hidden channels without activation (0.75 in the paper)."""

    idle: float = 0.75

    def to_dict(self) -> dict:
        return asdict(self)


def _check_idle(idle: float) -> float:
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0.0 <= float(idle) <= 1.0:
        raise VitkitError(f"RePaViT idle: the idle-channel fraction θ must be in [0, 1], got {idle!r}")
    return float(idle)


def _act_type(mlp: Mlp) -> type[nn.Module]:
    act = type(mlp.act)
    if act not in (nn.GELU,):
        raise VitkitError(f"RePaViT: the FFN activation is {act.__name__}; only GELU is supported")
    return act


def apply_repavit(model: nn.Module, cfg: RePaViTConfig | dict | None = None) -> nn.Module:
    """Channel-idle FFN with BatchNorm in every block (in place); records ``repavit``. Train after."""
    cfg = RePaViTConfig(**cfg) if isinstance(cfg, dict) else (cfg or RePaViTConfig())
    idle = _check_idle(cfg.idle)
    blocks = all_blocks(model)
    if not blocks:
        raise VitkitError(f"RePaViT needs timm transformer Blocks; {type(model).__name__} has none")
    for i, blk in enumerate(blocks):
        if (
            type(blk.mlp) is not Mlp
            or not isinstance(blk.mlp.fc1, nn.Linear)
            or not isinstance(blk.mlp.norm, nn.Identity)
        ):
            raise VitkitError(
                f"RePaViT: block {i} FFN is {type(blk.mlp).__name__}; expected timm's plain Mlp"
            )
        if not isinstance(blk.norm2, nn.LayerNorm):
            raise VitkitError(f"RePaViT: block {i} norm2 is {type(blk.norm2).__name__}; expected a LayerNorm")
        hidden = blk.mlp.fc1.out_features
        act = math.ceil(hidden * (1.0 - idle))
        dim = blk.norm2.normalized_shape[0]
        w = blk.mlp.fc1.weight
        blk.norm2 = TokenBatchNorm(dim).to(w.device, w.dtype)
        blk.mlp = ChannelIdleMlp(blk.mlp.fc1, blk.mlp.fc2, act, _act_type(blk.mlp))
    record_transform(model, "repavit", cfg.to_dict())
    return model


def replay_repavit(model: nn.Module, config: dict) -> nn.Module:
    return apply_repavit(model, RePaViTConfig(**config))


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN in eval mode as ``x·scale + shift``."""
    if bn.running_mean is None:
        raise VitkitError("RePaViT: BatchNorm without running statistics cannot be folded")
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def fold_block(blk: nn.Module) -> ReparamMlp:
    """The :class:`ReparamMlp` equal (in eval mode) to ``ls2(mlp(norm2(x)))`` of a RePaViT block."""
    mlp: ChannelIdleMlp = blk.mlp
    s1, t1 = _bn_affine(blk.norm2)
    s2, t2 = _bn_affine(mlp.norm)
    W1, W2 = mlp.fc1.weight, mlp.fc2.weight
    b1 = mlp.fc1.bias if mlp.fc1.bias is not None else torch.zeros_like(W1[:, 0])
    b2 = mlp.fc2.bias if mlp.fc2.bias is not None else torch.zeros_like(W2[:, 0])
    # BN1 before fc1: fc1(x·s1 + t1) = (W1·diag(s1))x + (W1·t1 + b1)
    W1f, b1f = W1 * s1[None, :], W1 @ t1 + b1
    # BN2 before fc2: fc2(h·s2 + t2) = (W2·diag(s2))h + (W2·t2 + b2)
    W2f, b2f = W2 * s2[None, :], W2 @ t2 + b2
    if isinstance(blk.ls2, LayerScale):
        g = blk.ls2.gamma
        W2f, b2f = W2f * g[:, None], b2f * g
    elif not isinstance(blk.ls2, nn.Identity):
        raise VitkitError(f"RePaViT: cannot fold ls2 of type {type(blk.ls2).__name__}")
    a = mlp.act_channels
    new = ReparamMlp(W1.shape[1], a, act_layer=type(mlp.act)).to(W1.device, W1.dtype)
    new.lin.weight.copy_(W2f[:, a:] @ W1f[a:])
    new.lin.bias.copy_(W2f[:, a:] @ b1f[a:] + b2f)
    if a:
        new.fc1.weight.copy_(W1f[:a])
        new.fc1.bias.copy_(b1f[:a])
        new.fc2.weight.copy_(W2f[:, :a])
    return new


def _reparam_structure(model: nn.Module, fold: bool) -> int:
    n = 0
    for blk in all_blocks(model):
        if not isinstance(blk.mlp, ChannelIdleMlp):
            continue
        if fold:
            new = fold_block(blk)
        else:
            w = blk.mlp.fc1.weight
            new = ReparamMlp(w.shape[1], blk.mlp.act_channels, act_layer=type(blk.mlp.act)).to(
                w.device, w.dtype
            )
        blk.mlp, blk.norm2, blk.ls2 = new, nn.Identity(), nn.Identity()
        n += 1
    return n


def reparameterize(model: nn.Module) -> nn.Module:
    """Fold every channel-idle FFN into its inference form (in place); records ``repavit_reparam``.

    Uses BatchNorm running statistics: call it on a trained model (it is put in eval mode).
    """
    manifest = get_manifest(model)
    if manifest is None or not any(t.name == "repavit" for t in manifest.transforms):
        raise VitkitError(
            "reparameterize: the model has no RePaViT channel-idle FFN (train it with apply_repavit first)"
        )
    model.eval()
    if _reparam_structure(model, fold=True) == 0:
        raise VitkitError("reparameterize: the model's FFNs are already reparameterized")
    record_transform(model, "repavit_reparam", {})
    return model


def replay_repavit_reparam(model: nn.Module, config: dict) -> nn.Module:
    _reparam_structure(model, fold=False)
    record_transform(model, "repavit_reparam", dict(config))
    return model


def ffn_macs_per_token(dim: int, hidden: int, idle: float) -> tuple[int, int]:
    """(channel-idle training FFN, reparameterized FFN) multiply-accumulates per token."""
    a = math.ceil(hidden * (1.0 - idle))
    return 2 * hidden * dim, dim * dim + 2 * a * dim


__all__ = [
    "ChannelIdleMlp",
    "RePaViTConfig",
    "ReparamMlp",
    "TokenBatchNorm",
    "apply_repavit",
    "ffn_macs_per_token",
    "fold_block",
    "reparameterize",
    "replay_repavit",
    "replay_repavit_reparam",
]


def train_transform(options: dict[str, str]) -> TrainTransform:
    """``vitkit train --transform repavit`` (options as ``key=value``): applied before training."""
    cfg = parse_config(RePaViTConfig, options, "repavit")
    return TrainTransform(apply=lambda model: apply_repavit(model, cfg))


register(
    Technique(
        name="repavit",
        summary="channel-idle FFNs with BatchNorm for training, foldable into fewer weights",
        paper='Xu et al., "RePaViT: Scalable Vision Transformer Acceleration via Structural Reparameterization on Feedforward Network Layers" (2025)',
        config=RePaViTConfig,
        replay=replay_repavit,
        export=AS_IS,
        family="compress",
        verb="vitkit train --transform repavit:idle=0.75",
        train=train_transform,
    )
)
register(
    Technique(
        name="repavit_reparam",
        summary="RePaViT's channel-idle FFNs folded into their inference form",
        paper='Xu et al., "RePaViT: Scalable Vision Transformer Acceleration via Structural Reparameterization on Feedforward Network Layers" (2025)',
        replay=replay_repavit_reparam,
        export=AS_IS,
        requires=("repavit",),
        family="compress",
        verb="vitkit reparam RUN",
    )
)

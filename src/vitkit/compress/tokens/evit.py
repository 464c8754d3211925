"""EViT — Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022.

Changes the model: the blocks at the chosen locations become :class:`EViTBlock`s that, between the
attention residual and the MLP, keep the ``ceil(keep * n)`` patch tokens the class token attends to
most (attention averaged over heads) and fuse the others into one token weighted by that attention
(weights not renormalized, as in the official code). The fused token is an ordinary token in later
blocks. Every prefix token (cls, dist, registers) is always kept, in front.

Faithful to youweiliang/evit (``evit.py``, ``helpers.py: adjust_keep_rate``) in the scoring, the
top-k selection, the fusion and the keep-rate warm-up schedule (keep 1 for ``start_epochs``, then a
per-iteration cosine from 1 to the target over ``shrink_epochs``). Differences on purpose: timm's
own Block submodules (LayerScale, q/k-norm) are reused instead of a forked timm 0.4; the class
token's attention row is computed from the q/k tap (one 1×N row per head) so the fused attention
kernel keeps running, unless another hook or a replaced softmax/matmul is present, in which case the
probabilities come from the module's explicit path; any number of prefix tokens is supported.
The block reports what it kept to :func:`vitkit.models.token_reduction_trace` listeners (visualization).
``global_pool='avg'`` pools over the kept and fused tokens with equal weight (EViT defines no
pooling besides the class token).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitkit.compress._blocks import WrappedBlock, parse_int_list, refuse_attention_mask, transformer_blocks
from vitkit.errors import VitkitError
from vitkit.models import AttentionState, TokenStep, TokenTapMixin, num_prefix_tokens, record_transform
from vitkit.registry import AS_IS, Technique, register
from vitkit.train.callbacks import Callback, TrainContext


def kept_tokens(keep_rate: float, n: int) -> int:
    """How many of ``n`` non-prefix tokens a block with ``keep_rate`` keeps (EViT: ceil(k·n))."""
    return min(n, math.ceil(keep_rate * n))


class EViTBlock(TokenTapMixin, WrappedBlock):
    """A timm ``Block`` that keeps the most attended tokens and fuses the rest (see module docstring)."""

    def __init__(self, block: Block, keep_rate: float, num_prefix: int, fuse: bool = True):
        super().__init__(block)
        self.keep_rate = float(keep_rate)
        self.num_prefix = int(num_prefix)
        self.fuse = bool(fuse)

    def _cls_attention_tap(self, out: list[torch.Tensor]):
        P = self.num_prefix
        # Fast path: with nothing else hooked, the probabilities the fused kernel computes are
        # softmax(q·kᵀ·scale); only the class token's row is needed (1×N per head).
        plain = self.attn.uses_sdpa and not self.attn._bias_hooks

        def tap(s: AttentionState) -> None:
            if plain:
                logits = (s.q[:, :, :1] * s.module.scale) @ s.k.transpose(-2, -1)
                row = logits.softmax(dim=-1)[:, :, 0]
            else:
                row = s.probs[:, :, 0]
            out.append(row.mean(dim=1)[:, P:])  # (B, N - P): mean over heads, non-prefix keys

        return self.attn.register_tap(tap, needs_probs=not plain)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        P = self.num_prefix
        n = x.shape[1] - P
        k = kept_tokens(self.keep_rate, n)
        if k >= n:  # keep rate 1 (or warm-up): exactly the timm block, mask included
            if self.has_token_taps:  # every token kept, in order (for visualization)
                kept_all = torch.arange(n, device=x.device).expand(x.shape[0], -1)
                self.emit_token_step(TokenStep("keep", n, n, P, kept=kept_all))
            return self.mlp_residual(self.attention_residual(x, attn_mask, is_causal))
        refuse_attention_mask(attn_mask, is_causal, "EViT block", "it drops and fuses tokens")
        scores: list[torch.Tensor] = []
        handle = self._cls_attention_tap(scores)
        try:
            x = self.attention_residual(x)
        finally:
            handle.remove()
        a = scores[0]
        prefix, tokens = x[:, :P], x[:, P:]
        C = x.shape[-1]
        idx = a.topk(k, dim=1, largest=True, sorted=True).indices
        kept = tokens.gather(1, idx[..., None].expand(-1, -1, C))
        parts = [prefix, kept]
        if self.fuse:
            dropped = torch.ones_like(a).scatter(1, idx, 0.0)  # 1 for the inattentive tokens
            w = (a * dropped)[..., None]
            parts.append((tokens * w).sum(dim=1, keepdim=True))
        x = torch.cat(parts, dim=1)
        if self.has_token_taps:
            step = TokenStep("keep", n, k + int(self.fuse), P, kept=idx, scores=a, fused=self.fuse)
            self.emit_token_step(step)
        return self.mlp_residual(x)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, num_prefix={self.num_prefix}, fuse={self.fuse}"


@dataclass
class EViTConfig:
    """``keep``: fraction of non-prefix tokens kept in each reducing block, in (0, 1].
    ``at``: 0-based indices of the reducing blocks (EViT's default for 12 blocks: 3, 6, 9; the
    default here spreads three locations over the depth the same way). ``fuse``: fuse the
    inattentive tokens into one (EViT's default) or drop them."""

    keep: float = 0.7
    at: list[int] = field(default_factory=list)
    fuse: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def default_locations(depth: int) -> list[int]:
    """EViT's (3, 6, 9) of 12 blocks, scaled to ``depth`` (every quarter of the depth)."""
    return sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3)} - {depth})


def check_keep_rate(keep: float, field_name: str = "keep") -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise VitkitError(f"EViT {field_name}: the keep rate must be in (0, 1], got {keep!r}")
    return float(keep)


def apply_evit(model: nn.Module, cfg: EViTConfig | dict | None = None) -> nn.Module:
    """Turn the blocks at ``cfg.at`` into :class:`EViTBlock`s (in place); records ``evit``."""
    cfg = EViTConfig(**cfg) if isinstance(cfg, dict) else (cfg or EViTConfig())
    keep = check_keep_rate(cfg.keep)
    blocks = transformer_blocks(model, "EViT")
    depth = len(blocks)
    at = parse_int_list(cfg.at, "EViT at") or default_locations(depth)
    bad = [i for i in at if not 0 <= i < depth]
    if bad:
        raise VitkitError(
            f"EViT at: block indices {bad} are outside the model's {depth} blocks (0..{depth - 1})"
        )
    if getattr(model, "cls_token", None) is None:
        raise VitkitError(
            f"EViT scores tokens by the class token's attention, and {type(model).__name__} has no class token "
            "(use ToMe instead)"
        )
    P = num_prefix_tokens(model)
    for i in sorted(set(at)):
        blocks[i] = EViTBlock(blocks[i], keep, P, cfg.fuse)
    cfg.keep, cfg.at = keep, sorted(set(at))
    record_transform(model, "evit", cfg.to_dict())
    return model


def replay_evit(model: nn.Module, config: dict) -> nn.Module:
    return apply_evit(model, EViTConfig(**config))


def evit_blocks(model: nn.Module) -> list[EViTBlock]:
    return [m for m in model.modules() if isinstance(m, EViTBlock)]


def set_keep_rate(model: nn.Module, keep: float) -> None:
    """Set the keep rate of every EViT block (used by the warm-up schedule and for sweeps)."""
    keep = check_keep_rate(keep)
    for blk in evit_blocks(model):
        blk.keep_rate = keep


def scheduled_keep_rate(
    progress_epochs: float, target: float, start_epochs: float, shrink_epochs: float
) -> float:
    """EViT's ``adjust_keep_rate``: 1 before ``start_epochs``, then cosine from 1 down to ``target``
    over ``shrink_epochs`` (``progress_epochs`` may be fractional: per-iteration schedule)."""
    if progress_epochs < start_epochs:
        return 1.0
    if shrink_epochs <= 0 or progress_epochs >= start_epochs + shrink_epochs:
        return target
    t = (progress_epochs - start_epochs) / shrink_epochs
    return target + (1.0 - target) * (math.cos(t * math.pi) + 1.0) / 2.0


class KeepRateSchedule(Callback):
    """EViT's keep-rate warm-up as a training-loop callback (``fit(..., callbacks=[...])``): keep rate 1
    for ``start_epochs``, then a cosine from 1 down to ``target`` over ``shrink_epochs``, set on every
    EViT block before every step (per iteration, as EViT's ``adjust_keep_rate``) or, with
    ``per_step=False``, once per epoch. Works with any objective; positions come from the loop, so a
    resumed run continues the schedule where it stopped.
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        start_epochs: float = 0.0,
        shrink_epochs: float = 1.0,
        per_step: bool = True,
    ):
        self.blocks = evit_blocks(model)
        if not self.blocks:
            raise VitkitError("KeepRateSchedule: the model has no EViT blocks (apply_evit first)")
        self.target = check_keep_rate(target, "target keep rate")
        self.start_epochs, self.shrink_epochs = float(start_epochs), float(shrink_epochs)
        self.per_step = per_step
        self.current = 1.0

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        self._set(epoch)

    def on_step_start(self, ctx: TrainContext) -> None:
        if self.per_step:
            self._set(ctx.progress_epochs)

    def _set(self, progress: float) -> None:
        self.current = scheduled_keep_rate(progress, self.target, self.start_epochs, self.shrink_epochs)
        for blk in self.blocks:
            blk.keep_rate = self.current

    def finish(self) -> None:
        """Set the target keep rate (the state the model is saved and evaluated in)."""
        for blk in self.blocks:
            blk.keep_rate = self.target

    def describe(self) -> dict:
        return {
            "name": "evit_keep_rate_schedule",
            "target": self.target,
            "start_epochs": self.start_epochs,
            "shrink_epochs": self.shrink_epochs,
            "per_step": self.per_step,
        }


register(
    Technique(
        name="evit",
        summary="keep the tokens the class token attends to most, fuse the rest into one",
        paper='Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations" (2022)',
        config=EViTConfig,
        replay=replay_evit,
        export=AS_IS,
        family="compress",
        verb="vitkit reduce-tokens RUN --method evit --keep 0.7",
    )
)

"""VPT: "Visual Prompt Tuning" (Jia et al., ECCV 2022), shallow and deep, on timm ViTs.

What it changes: M learned prompt tokens are inserted right after the position embedding, behind
*all* prefix tokens (cls, dist, registers): ``[prefix, P, patches]``; VPT-deep replaces the prompt
slot with a fresh set before every later block. Only the prompts and the head train; the backbone
is frozen (``requires_grad=False``) and kept in eval mode while the prompts train (dropout,
drop-path and patch-dropout off), as in KMnP/vpt's overridden ``train()``.

How, without forking timm's ``VisionTransformer.forward``: by composition.
* timm calls ``patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks`` in ``forward_features``
  *and* ``forward_intermediates``. ``model.patch_drop`` (the step right after the position
  embedding) is replaced by :class:`PromptTokens`, which runs the original patch dropout and then
  inserts the shallow prompts (so prompts get no position embedding and pass through ``norm_pre``).
* Deep prompts: every block after the first is wrapped in :class:`DeepPromptBlock`, which overwrites
  the M prompt slots of its input and calls the timm block unchanged (LayerScale, q/k-norm kept).
* ``model.num_prefix_tokens`` grows by M, so timm's pooling (``avg`` skips prefix tokens, ``token``
  takes index 0) and ``forward_intermediates`` (splits off the prefix) ignore the prompts.
* The backbone stays in eval mode through a forward pre-hook on the model
  (:func:`vitkit.adapt.common.keep_backbone_in_eval`); no ``train()`` override.

Defaults as KMnP/vpt: prompts initialised ``U(-v, v)`` with ``v = sqrt(6 / (3·p² + d))`` (p = patch
size), prompt dropout 0, no prompt projection (``PROJECT=-1``). Simplified: the prompt projection
option and the paper's per-task hyper-parameter grid are not implemented.
Refused: models with ``dynamic_img_size`` whose position embedding covers prefix tokens (timm resamples
it using ``num_prefix_tokens``, which the prompts change).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.adapt.common import (
    AdapterModule,
    freeze,
    keep_backbone_in_eval,
    model_label,
    set_head_trainable,
    transformer_blocks,
)
from vitkit.errors import VitkitError
from vitkit.models import record_transform
from vitkit.registry import AS_IS, Technique, parse_config, register


class VPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_prompts: int = Field(5, ge=0, description="M prompt tokens (0 = the plain model)")
    deep: bool = Field(False, description="fresh prompts before every block (VPT-deep)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the prompts")
    train_head: bool = True


class _Prompts(AdapterModule):
    """M learned tokens (1, M, D) and their dropout; trains while the backbone stays in eval."""

    def __init__(self, num_prompts: int, dim: int, init_bound: float, dropout: float):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-init_bound, init_bound))
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch: int) -> torch.Tensor:
        return self.dropout(self.prompts).expand(batch, -1, -1)


class PromptTokens(nn.Module):
    """Replaces ``model.patch_drop``: the original patch dropout, then the shallow prompts inserted
    after the ``start`` prefix tokens."""

    def __init__(self, patch_drop: nn.Module, start: int, prompts: _Prompts):
        super().__init__()
        self.patch_drop = patch_drop
        self.start = start
        self.vpt = prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_drop(x)
        p = self.vpt(x.shape[0]).to(x.dtype)
        return torch.cat([x[:, : self.start], p, x[:, self.start :]], dim=1)


class DeepPromptBlock(nn.Module):
    """A timm block whose input prompt slots are replaced by this layer's own prompts (VPT-deep)."""

    def __init__(self, block: nn.Module, start: int, prompts: _Prompts):
        super().__init__()
        self.wrapped_block = block
        self.start = start
        self.vpt = prompts

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        p = self.vpt(x.shape[0]).to(x.dtype)
        m = p.shape[1]
        x = torch.cat([x[:, : self.start], p, x[:, self.start + m :]], dim=1)
        return self.wrapped_block(x, *args, **kwargs)


def _check_wrappable(model: nn.Module) -> None:
    label = model_label(model)
    for attr, what in (
        ("patch_drop", "the step after the position embedding where prompts go"),
        ("num_prefix_tokens", "the prefix-token count pooling reads"),
        ("embed_dim", "the token width"),
    ):
        if not hasattr(model, attr):
            raise VitkitError(f"vpt needs a timm VisionTransformer; {label} has no `{attr}` ({what})")
    if isinstance(model.patch_drop, PromptTokens):
        raise VitkitError(f"vpt: {label} already carries VPT prompts")
    if getattr(model, "dynamic_img_size", False) and not getattr(model, "no_embed_class", False):
        raise VitkitError(
            f"vpt: {label} uses dynamic_img_size with position embeddings on its prefix tokens; "
            "timm resamples them by num_prefix_tokens, which prompts would shift (build it without dynamic_img_size)"
        )


def _init_bound(model: nn.Module) -> float:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    p = int(patch[0]) * int(patch[1])
    return math.sqrt(6.0 / float(3 * p + model.embed_dim))


def apply_vpt(model: nn.Module, cfg: VPTConfig | dict[str, Any] | None = None) -> nn.Module:
    """Insert VPT prompts (shallow or deep), freeze the backbone, keep it in eval while training."""
    cfg = parse_config(VPTConfig, cfg, "vpt")
    _check_wrappable(model)
    blocks = transformer_blocks(model, "vpt")
    start = int(model.num_prefix_tokens)
    dim = int(model.embed_dim)
    bound = _init_bound(model)
    freeze(model)
    model.patch_drop = PromptTokens(
        model.patch_drop, start, _Prompts(cfg.num_prompts, dim, bound, cfg.dropout)
    )
    if cfg.deep:
        for i in range(1, len(blocks)):
            model.blocks[i] = DeepPromptBlock(
                blocks[i], start, _Prompts(cfg.num_prompts, dim, bound, cfg.dropout)
            )
    model.num_prefix_tokens = start + cfg.num_prompts
    set_head_trainable(model, cfg.train_head)
    keep_backbone_in_eval(model)
    record_transform(model, "vpt", cfg.model_dump())
    return model


def replay_vpt(model: nn.Module, config: dict) -> nn.Module:
    return apply_vpt(model, VPTConfig(**config))


register(
    Technique(
        name="vpt",
        summary="learned prompt tokens after the prefix tokens (shallow or deep); backbone frozen",
        paper='Jia et al., "Visual Prompt Tuning" (2022)',
        config=VPTConfig,
        replay=replay_vpt,
        export=AS_IS,
        family="adapt",
        verb="vitkit finetune RUN --peft vpt-shallow|vpt-deep",
    )
)

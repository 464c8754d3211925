"""DVPT: "DVPT: Dynamic Visual Prompt Tuning of Large Pre-trained Models for Medical Image Analysis"
(He et al., arXiv 2307.09787, 2023; Neural Networks 2025). **The paper's reading, not the released code.**

What it changes: after every (frozen) transformer block, one module shared across layers turns the
block output X (B, N, d) into sample-specific prompts and adds their read-out back to X:

    Xd = GELU(LN(X) W_down + b)          bottleneck r (the "lightweight bottleneck")
    P̂  = softmax(P Xdᵀ / √r) Xd          M learnable prompt queries cross-attend to the features
    Xp = softmax(Xd P̂ᵀ / √r) P̂           every token reads the dynamic prompts
    X  ← X + γ · (Xp W_up + b_up)        γ a zero-initialised scalar gate

So at initialisation (γ = 0) the model *is* the frozen model (tested to 1e-6). Only the shared
module(s) and the head train; the backbone is frozen and kept in eval mode.

Our reading (the paper's text gives the four steps, not the equations): the exact cross-attention
form above (single head, scaled dot product, prompts as queries then tokens reading the prompts back),
the non-affine LayerNorm before the down-projection, GELU, and applying the module to the block
*output*, on all tokens including the prefix. One module is shared by all blocks (``group_size=0``)
or by each group of ``group_size`` consecutive blocks (the released code shares one per 3 blocks).
Trainable parameters per shared module: ``2·d·r + r + d + M·r + 1``.

How the released code differs (NKUhealong/DVPT ``code/model.py``; research note §6): it prepends 50
prompt tokens with their own position embedding before CLS, adds a gated parallel adapter
``Down(d→20) → QuickGELU → Up`` on the un-normalised residual in the MLP branch, computes the
cross-attention but never uses it, and pools prompts+CLS. That variant is *not* implemented here.

Composition: blocks are wrapped in :class:`DVPTBlock` (the timm block runs unchanged, LayerScale and
q/k-norm kept); the shared modules live once in ``model.dvpt`` (one copy in the state dict), the
wrappers hold unregistered references to them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
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


class DVPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bottleneck: int = Field(20, gt=0, description="r, the bottleneck width (the released code uses 20)")
    num_prompts: int = Field(10, gt=0, description="M learnable prompt queries")
    group_size: int = Field(0, ge=0, description="blocks sharing one module (0 = all blocks share one)")
    train_head: bool = True


class DVPTModule(AdapterModule):
    """The shared dynamic-prompt module (see the module docstring for the equations)."""

    def __init__(self, dim: int, bottleneck: int, num_prompts: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.down = nn.Linear(dim, bottleneck)
        self.prompts = nn.Parameter(torch.empty(num_prompts, bottleneck))
        self.up = nn.Linear(bottleneck, dim)
        self.gate = nn.Parameter(torch.zeros(1))
        self.scale = 1.0 / math.sqrt(bottleneck)
        nn.init.trunc_normal_(self.prompts, std=0.02)
        nn.init.trunc_normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.trunc_normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)

    def dynamic_prompts(self, xd: torch.Tensor) -> torch.Tensor:
        """P̂ (B, M, r): the learnable queries attend over the bottlenecked features."""
        attn = torch.einsum("mr,bnr->bmn", self.prompts.to(xd.dtype), xd) * self.scale
        return torch.einsum("bmn,bnr->bmr", attn.softmax(dim=-1), xd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = F.gelu(self.down(self.norm(x)))
        p_hat = self.dynamic_prompts(xd)
        attn = torch.einsum("bnr,bmr->bnm", xd, p_hat) * self.scale
        xp = torch.einsum("bnm,bmr->bnr", attn.softmax(dim=-1), p_hat)
        return x + self.gate.to(x.dtype) * self.up(xp)


class DVPTBlock(nn.Module):
    """A timm block followed by its group's shared :class:`DVPTModule` (held by reference)."""

    def __init__(self, block: nn.Module, shared: DVPTModule, group: int):
        super().__init__()
        self.wrapped_block = block
        self.group = group
        # Not registered: the module is registered once, in model.dvpt (one state-dict copy).
        object.__setattr__(self, "shared", shared)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.shared(self.wrapped_block(x, *args, **kwargs))

    def extra_repr(self) -> str:
        return f"shared=dvpt.{self.group}"


def apply_dvpt(model: nn.Module, cfg: DVPTConfig | dict[str, Any] | None = None) -> nn.Module:
    """Wrap every block with the shared DVPT module(s); freeze the backbone, keep it in eval."""
    cfg = parse_config(DVPTConfig, cfg, "dvpt")
    blocks = transformer_blocks(model, "dvpt")
    if hasattr(model, "dvpt"):
        raise VitkitError(f"dvpt: {model_label(model)} already carries DVPT modules")
    dim = getattr(model, "embed_dim", None)
    if dim is None:
        raise VitkitError(f"dvpt needs a timm VisionTransformer; {model_label(model)} has no `embed_dim`")
    group = cfg.group_size or len(blocks)
    n_shared = math.ceil(len(blocks) / group)
    freeze(model)
    model.dvpt = nn.ModuleList(DVPTModule(int(dim), cfg.bottleneck, cfg.num_prompts) for _ in range(n_shared))
    for i, block in enumerate(blocks):
        model.blocks[i] = DVPTBlock(block, model.dvpt[i // group], i // group)
    set_head_trainable(model, cfg.train_head)
    keep_backbone_in_eval(model)
    record_transform(model, "dvpt", cfg.model_dump())
    return model


def replay_dvpt(model: nn.Module, config: dict) -> nn.Module:
    return apply_dvpt(model, DVPTConfig(**config))


register(
    Technique(
        name="dvpt",
        summary="sample-specific prompts from a shared bottleneck after every frozen block",
        paper='He et al., "DVPT: Dynamic Visual Prompt Tuning of Large Pre-trained Models for Medical Image Analysis" (2023)',
        config=DVPTConfig,
        replay=replay_dvpt,
        export=AS_IS,
        family="adapt",
        verb="vitkit finetune RUN --peft dvpt",
    )
)

"""LoRA: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., ICLR 2022), on timm ViTs.

What it changes: frozen linear layers get a trainable low-rank update ``W + (alpha / r) * B A``
(``A`` Kaiming-uniform, ``B`` zero, so the model at initialisation is the pretrained one).

Two transforms:
* :func:`apply_lora` goes through ``peft`` (its custom-model path: ``peft.inject_adapter_in_model``
  with a ``LoraConfig`` whose ``target_modules`` are full module names). The names are built from the
  model's *types*, by role: ``qkv``/``proj`` of every attention module (timm ``Attention`` or
  vitkit's), ``fc1``/``fc2`` of every timm ``Mlp``; never by substring. The model stays the timm
  model (``forward_features``, ``forward_intermediates``, ``num_prefix_tokens`` unchanged); peft
  renames the wrapped layers' keys (``qkv.base_layer.weight``, ``qkv.lora_A.default.weight``), and
  the replay rebuilds exactly those keys so ``vitkit.load`` round-trips.
* :func:`apply_lora_qv` is ours: LoRA on the Q and V slices of timm's *fused* ``qkv`` projection,
  as in the LoRA paper's ViT/GPT setting (peft can only adapt the whole fused projection, see
  huggingface/peft#1705). :class:`LoRAQVLinear` replaces ``attn.qkv`` by type and adds
  ``[ΔQ, 0, ΔV]`` to its output.

:func:`merge_lora` folds every adapter (both kinds) into its base weight and puts the plain
``nn.Linear`` back: the result is a plain timm model whose outputs equal the adapted one's (tested
≤ 1e-5), and the LoRA records leave the manifest.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.adapt.common import (
    attention_of,
    freeze,
    mlp_of,
    replace_module,
    resolve_block_indices,
    set_head_trainable,
    transformer_blocks,
)
from vitkit.errors import VitkitError
from vitkit.models import get_manifest, record_transform
from vitkit.registry import Technique, parse_config, prepare_with, register

Role = Literal["qkv", "proj", "fc1", "fc2"]
#: Transforms that merge_lora folds away (ExPLoRA's LoRA is ours, the unfrozen block is plain).
MERGEABLE = ("lora", "lora-qv", "explora")


class LoRAConfig(BaseModel):
    """peft LoRA on linear layers chosen by role."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, gt=0)
    alpha: float = Field(8.0, gt=0, description="scaling numerator: the update is (alpha / rank) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    targets: list[Role] = Field(default_factory=lambda: ["qkv"], min_length=1)
    blocks: list[int] | None = Field(None, description="block indices to adapt [default: all]")
    train_head: bool = True


class LoRAQVConfig(BaseModel):
    """Our LoRA on the Q and V slices of the fused qkv projection."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, gt=0)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    blocks: list[int] | None = Field(None, description="block indices to adapt [default: all]")
    train_head: bool = True


# -- finding the targets by type ------------------------------------------------------------------
def _fused_qkv(attn: nn.Module, where: str, technique: str) -> nn.Linear:
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, LoRAQVLinear):
        raise VitkitError(f"{technique}: {where}.qkv already carries LoRA-QV")
    if not isinstance(qkv, nn.Linear):
        raise VitkitError(
            f"{technique} needs a fused `qkv` nn.Linear in every attention; {where} "
            f"({type(attn).__name__}) has {type(qkv).__name__ if qkv is not None else 'none'}"
        )
    return qkv


def role_modules(
    model: nn.Module, roles: list[str], blocks: list[int] | None, technique: str = "lora"
) -> dict[str, nn.Linear]:
    """Full module names of the linear layers playing ``roles`` in the chosen blocks."""
    all_blocks = transformer_blocks(model, technique)
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Linear] = {}
    for i in resolve_block_indices(blocks, len(all_blocks), f"{technique}.blocks"):
        block = all_blocks[i]
        where = f"blocks.{i}"
        for role in roles:
            if role in ("qkv", "proj"):
                attn = attention_of(block, where, technique)
                layer = _fused_qkv(attn, f"{where}.attn", technique) if role == "qkv" else attn.proj
            else:
                layer = getattr(mlp_of(block, where, technique), role)
            if not isinstance(layer, nn.Linear):
                raise VitkitError(
                    f"{technique}: {where} {role} is {type(layer).__name__}, not an nn.Linear peft can wrap"
                )
            out[names[id(layer)]] = layer
    return out


# -- peft LoRA ------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, cfg: LoRAConfig | dict[str, Any] | None = None) -> nn.Module:
    """LoRA through peft on the ``cfg.targets`` roles; freezes everything else but the head."""
    import peft
    from peft.tuners.lora import LoraLayer

    cfg = parse_config(LoRAConfig, cfg, "lora")
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise VitkitError("lora: the model already carries peft LoRA adapters (merge them first)")
    targets = role_modules(model, list(cfg.targets), cfg.blocks, "lora")
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=sorted(targets),
        bias="none",
    )
    peft.inject_adapter_in_model(peft_cfg, model)
    freeze(model)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]:
                p.requires_grad_(True)
    set_head_trainable(model, cfg.train_head)
    record_transform(model, "lora", cfg.model_dump())
    return model


def replay_lora(model: nn.Module, config: dict) -> nn.Module:
    return apply_lora(model, LoRAConfig(**config))


# -- our LoRA on the Q and V slices of a fused qkv ------------------------------------------------
class LoRAQVLinear(nn.Module):
    """A fused ``qkv`` linear plus low-rank updates of its Q and V output slices (K untouched)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.out_features % 3:
            raise VitkitError(f"lora-qv: a fused qkv has 3·D outputs, got {base.out_features}")
        self.base_layer = base
        self.dim = base.out_features // 3
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dd = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_q_A = nn.Linear(base.in_features, rank, bias=False, **dd)
        self.lora_q_B = nn.Linear(rank, self.dim, bias=False, **dd)
        self.lora_v_A = nn.Linear(base.in_features, rank, bias=False, **dd)
        self.lora_v_B = nn.Linear(rank, self.dim, bias=False, **dd)
        for a, b in ((self.lora_q_A, self.lora_q_B), (self.lora_v_A, self.lora_v_B)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as peft / the LoRA reference code
            nn.init.zeros_(b.weight)

    # The attention module reads these from its qkv (e.g. for shapes): answer like the base layer.
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """ΔW (3D, in) = scaling · [B_q A_q; 0; B_v A_v]."""
        dq = self.lora_q_B.weight @ self.lora_q_A.weight
        dv = self.lora_v_B.weight @ self.lora_v_A.weight
        return self.scaling * torch.cat([dq, torch.zeros_like(dq), dv], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = self.lora_dropout(x)
        dq = self.lora_q_B(self.lora_q_A(h)) * self.scaling
        dv = self.lora_v_B(self.lora_v_A(h)) * self.scaling
        q, k, v = out.split(self.dim, dim=-1)
        return torch.cat([q + dq, k, v + dv], dim=-1)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with ΔW folded into its weight."""
        base = self.base_layer
        base.weight.add_(self.delta_weight().to(base.weight.dtype))
        return base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, slices=q,v"


def add_lora_qv(
    model: nn.Module, blocks: list[int], rank: int, alpha: float, dropout: float, technique: str
) -> list[LoRAQVLinear]:
    """Swap the fused qkv of the given blocks' attention for :class:`LoRAQVLinear`."""
    all_blocks = transformer_blocks(model, technique)
    added = []
    for i in blocks:
        attn = attention_of(all_blocks[i], f"blocks.{i}", technique)
        qkv = _fused_qkv(attn, f"blocks.{i}.attn", technique)
        attn.qkv = LoRAQVLinear(qkv, rank, alpha, dropout)
        added.append(attn.qkv)
    return added


def apply_lora_qv(model: nn.Module, cfg: LoRAQVConfig | dict[str, Any] | None = None) -> nn.Module:
    """LoRA on the Q and V slices of every (chosen) block's fused qkv; freezes all else but the head."""
    cfg = parse_config(LoRAQVConfig, cfg, "lora-qv")
    depth = len(transformer_blocks(model, "lora-qv"))
    added = add_lora_qv(
        model,
        resolve_block_indices(cfg.blocks, depth, "lora-qv.blocks"),
        cfg.rank,
        cfg.alpha,
        cfg.dropout,
        "lora-qv",
    )
    freeze(model)
    for layer in added:
        for m in (layer.lora_q_A, layer.lora_q_B, layer.lora_v_A, layer.lora_v_B):
            m.weight.requires_grad_(True)
    set_head_trainable(model, cfg.train_head)
    record_transform(model, "lora-qv", cfg.model_dump())
    return model


def replay_lora_qv(model: nn.Module, config: dict) -> nn.Module:
    return apply_lora_qv(model, LoRAQVConfig(**config))


def _lora_types() -> tuple[type, ...]:
    """LoRA layer types present: peft's only once peft is imported (no peft layer can exist before;
    importing peft costs seconds, so models with LoRA-QV alone never pay for it)."""
    lora_mod = sys.modules.get("peft.tuners.lora")
    return (LoRAQVLinear, lora_mod.LoraLayer) if lora_mod is not None else (LoRAQVLinear,)


# -- merging ---------------------------------------------------------------------------------------
@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter (peft's and LoRA-QV) into its base weight and unwrap it, in place.

    The result holds plain ``nn.Linear`` s again (a plain timm model), computes the same function,
    and its manifest no longer lists the LoRA transforms (nor ExPLoRA's, whose other changes are
    plain weights). ``requires_grad`` flags are left as they were.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _lora_types())]
    for name, m in found:
        if isinstance(m, LoRAQVLinear):
            replace_module(model, name, m.merged())
        else:
            m.merge(safe_merge=True)
            replace_module(model, name, m.get_base_layer())
    if "peft_config" in vars(model):
        del model.peft_config
    manifest = get_manifest(model)
    if manifest is not None:
        manifest.transforms = [t for t in manifest.transforms if t.name not in MERGEABLE]
    return model


def lora_parameters(model: nn.Module) -> list[str]:
    """Names of all LoRA adapter parameters (both kinds)."""
    names = []
    for mod_name, m in model.named_modules():
        if isinstance(m, _lora_types()):
            names += [f"{mod_name}.{n}" for n, _ in m.named_parameters() if n.startswith("lora_")]
    return names


__all__ = [
    "LoRAConfig",
    "LoRAQVConfig",
    "LoRAQVLinear",
    "apply_lora",
    "apply_lora_qv",
    "lora_parameters",
    "merge_lora",
    "role_modules",
]


register(
    Technique(
        name="lora",
        summary="low-rank updates on frozen linears (peft); merged into the weights for export",
        paper='Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2022)',
        config=LoRAConfig,
        replay=replay_lora,
        export=prepare_with(merge_lora),
        family="adapt",
        verb="vitkit finetune RUN --peft lora",
    )
)
register(
    Technique(
        name="lora-qv",
        summary="LoRA on the query and value projections only (inside the fused qkv)",
        paper='Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2022)',
        config=LoRAQVConfig,
        replay=replay_lora_qv,
        export=prepare_with(merge_lora),
        family="adapt",
        verb="vitkit finetune RUN --peft lora-qv",
    )
)

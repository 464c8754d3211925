"""ExPLoRA: "ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers under
Domain Shifts" (Khanna et al., ICML 2025). **No official code** (the repository is a README): the
choices marked "ours" below are our reading of the paper's abstract and project page.

What it changes: stage 1 continues the backbone's *own* self-supervised objective (here MAE) on
unlabelled images of the target domain, training only 1-2 whole blocks (plus every LayerNorm) and
LoRA on all other blocks; stage 2 merges the LoRA into the weights and fine-tunes with a fresh LoRA
(``vitkit finetune RUN --peft lora``) or fits a linear probe (``vitkit evaluate RUN --probe linear``).

:func:`apply_explora` is the stage-1 model transform (recorded in the manifest, replayable);
:func:`vitkit.stages.pretrain.explora_pretrain` runs stage 1 (MAE pretraining from a run, with this
transform on the encoder) and writes the *merged* encoder as a plain run, ready for stage 2. (This module composes the MAE objective from
``vitkit.pretrain``: ExPLoRA is extended pretraining, the one adaptation that needs it.)

Our choices:
* Unfrozen block(s): the last one by default (``unfreeze_blocks=[-1]``); the paper picks them by a
  spectral analysis of the features, which is not implemented (configurable instead).
* LoRA: our LoRA on the Q and V slices of the fused ``qkv`` (the LoRA paper's targets), rank 8,
  alpha 8, on every block that is not unfrozen; ``lora="qkv"`` uses peft on the whole fused qkv.
* Norms: every ``nn.LayerNorm`` (found by type, timm's included) trains, in every block and the
  final/fc norm ("and all normalization layers", paper v1).
* Everything else frozen: patch embedding, position embedding, cls/register tokens. The MAE decoder
  trains (it is reused from the source run when that run was MAE-pretrained with the same decoder,
  else built fresh).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.adapt.common import freeze, resolve_block_indices, transformer_blocks
from vitkit.adapt.lora import add_lora_qv, lora_parameters, role_modules
from vitkit.models import record_transform
from vitkit.registry import Technique, parse_config, prepare_with, register


class ExploraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    unfreeze_blocks: list[int] = Field(default_factory=lambda: [-1], min_length=1, max_length=2)
    rank: int = Field(8, gt=0)
    alpha: float = Field(8.0, gt=0)
    lora: Literal["qv", "qkv"] = Field("qv", description="ours on Q,V slices, or peft on the fused qkv")
    train_norms: bool = True


def apply_explora(model: nn.Module, cfg: ExploraConfig | dict[str, Any] | None = None) -> nn.Module:
    """Stage-1 ExPLoRA: unfreeze the chosen blocks (and all LayerNorms), LoRA on every other block."""
    cfg = parse_config(ExploraConfig, cfg, "explora")
    blocks = transformer_blocks(model, "explora")
    unfrozen = resolve_block_indices(cfg.unfreeze_blocks, len(blocks), "explora.unfreeze_blocks")
    others = [i for i in range(len(blocks)) if i not in unfrozen]
    if cfg.lora == "qv":
        add_lora_qv(model, others, cfg.rank, cfg.alpha, 0.0, "explora")
    elif others:
        import peft

        targets = role_modules(model, ["qkv"], others, "explora")
        peft.inject_adapter_in_model(
            peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=sorted(targets)), model
        )
    freeze(model)
    for i in unfrozen:
        for p in blocks[i].parameters():
            p.requires_grad_(True)
    lora = set(lora_parameters(model))
    for name, p in model.named_parameters():
        if name in lora:
            p.requires_grad_(True)
    if cfg.train_norms:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                for p in m.parameters():
                    p.requires_grad_(True)
    record_transform(model, "explora", cfg.model_dump())
    return model


def replay_explora(model: nn.Module, config: dict) -> nn.Module:
    return apply_explora(model, ExploraConfig(**config))


register(
    Technique(
        name="explora",
        summary="extended self-supervised pretraining on a new domain: 1-2 blocks unfrozen, LoRA elsewhere",
        paper='Khanna et al., "ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers under Domain Shifts" (2025)',
        config=ExploraConfig,
        replay=replay_explora,
        export=prepare_with("vitkit.adapt.lora:merge_lora"),
        family="adapt",
        verb="vitkit pretrain --method explora --from RUN",
    )
)

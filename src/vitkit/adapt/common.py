"""What every adaptation transform shares: finding blocks and their parts by type, freezing, keeping a
frozen backbone in eval mode, counting trainable parameters, validating technique configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel
from timm.layers import Attention as TimmAttention
from timm.layers import GluMlp, Mlp
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import VitkitAttention, model_name

C = TypeVar("C", bound=BaseModel)

ATTENTION_TYPES: tuple[type[nn.Module], ...] = (VitkitAttention, TimmAttention)
MLP_TYPES: tuple[type[nn.Module], ...] = (Mlp, GluMlp)


def model_label(model: nn.Module) -> str:
    return f"{model_name(model)} ({type(model).__name__})"


def transformer_blocks(model: nn.Module, technique: str) -> list[nn.Module]:
    """``model.blocks`` as a list; a clear error for models that have none (CNNs, hybrid nets)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise VitkitError(
            f"{technique} needs a ViT with a `blocks` sequence of transformer blocks; "
            f"{model_label(model)} has none"
        )
    return list(blocks)


def unwrap_block(block: nn.Module) -> nn.Module:
    """The timm block inside vitkit's block wrappers (VPT-deep, DVPT)."""
    while hasattr(block, "wrapped_block"):
        block = block.wrapped_block
    return block


def attention_of(block: nn.Module, where: str, technique: str) -> nn.Module:
    """The block's self-attention module, found by type (timm ``Attention`` or vitkit's)."""
    for m in unwrap_block(block).modules():
        if isinstance(m, ATTENTION_TYPES):
            return m
    raise VitkitError(
        f"{technique} needs timm/vitkit Attention modules; {where} ({type(block).__name__}) has none"
    )


def mlp_of(block: nn.Module, where: str, technique: str) -> nn.Module:
    """The block's MLP (timm ``Mlp`` or ``GluMlp``, both with ``fc1``/``fc2``), found by type."""
    for m in unwrap_block(block).modules():
        if isinstance(m, MLP_TYPES):
            return m
    raise VitkitError(f"{technique} needs a timm Mlp (fc1/fc2) in every block; {where} has none")


def resolve_block_indices(indices: list[int] | None, depth: int, field: str) -> list[int]:
    """Block indices (negative ones count from the end) checked against the model's depth."""
    if indices is None:
        return list(range(depth))
    out = []
    for i in indices:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise VitkitError(f"{field}: block {i} does not exist (the model has {depth} blocks)")
        out.append(j)
    return sorted(set(out))


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def set_head_trainable(model: nn.Module, trainable: bool = True) -> None:
    """The classifier head(s) (``get_classifier()``; both heads of distilled models)."""
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            for p in head.parameters():
                p.requires_grad_(trainable)


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class ParameterCount:
    total: int
    trainable: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.fraction:.2f}%)"


def parameter_count(model: nn.Module) -> ParameterCount:
    params = list(model.parameters())
    return ParameterCount(
        total=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad)
    )


class AdapterModule(nn.Module):
    """Marker base class: modules that train while the frozen backbone around them stays in eval mode."""


def _backbone_stays_eval(model: nn.Module, args: tuple) -> None:
    # A forward pre-hook (a plain function of the module it is called on, so copies of the model,
    # e.g. timm's EMA, keep working): while the model trains, every module except the adapters is
    # put in eval mode, so the frozen backbone's dropout / drop-path / patch-dropout are off (VPT).
    if not model.training:
        return
    adapters = [m for m in model.modules() if isinstance(m, AdapterModule)]
    for m in model.modules():
        m.training = False
    model.training = True
    for a in adapters:
        a.train(True)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and any(p.requires_grad for p in head.parameters()):
        head.train(True)


def keep_backbone_in_eval(model: nn.Module) -> None:
    """Install the pre-hook once (transforms call this; replays call it again on a fresh model)."""
    if getattr(model, "_vitkit_backbone_eval", False):
        return
    model.register_forward_pre_hook(_backbone_stays_eval)
    object.__setattr__(model, "_vitkit_backbone_eval", True)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

"""Shared plumbing for transforms that swap timm ``Block``s for a subclass reusing their submodules.

A :class:`WrappedBlock` is built *from* an existing timm ``Block``: it holds the very same submodules
under the same names (``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``), so state
dicts stay interchangeable with timm, LayerScale and q/k-norm are kept, and later transforms that
look for ``Block`` by type (pruning, RePaViT) still find it. Subclasses override ``forward`` only to
insert their step *between* the attention residual and the MLP residual, and keep timm's
``forward(x, attn_mask=None, is_causal=False)`` signature: the mask goes to ``self.attn`` as in timm's
``Block``, or, in a block that changes the number of tokens, is refused with one line
(:func:`refuse_attention_mask`) rather than dropped.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import VitkitAttention

BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class WrappedBlock(Block):
    """A timm ``Block`` subclass that reuses an existing block's submodules (see module docstring)."""

    def __init__(self, block: Block):
        nn.Module.__init__(self)  # Block.__init__ would build fresh layers; we adopt the given ones
        for name in BLOCK_PARTS:
            setattr(self, name, getattr(block, name))
        self.train(block.training)

    def attention_residual(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)  # as timm's Block
        return x + self.drop_path1(self.ls1(attn))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def refuse_attention_mask(
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    what: str,
    reason: str = "it changes the number of tokens",
) -> None:
    """One-line error when a mask reaches a block that cannot honour it (timm passes masks to every
    block alike; a block that merges or drops tokens would apply it to the wrong tokens)."""
    if attn_mask is not None or is_causal:
        given = "an attention mask" if attn_mask is not None else "is_causal=True"
        raise VitkitError(f"{what}: got {given}, which this block cannot honour: {reason}")


def transformer_blocks(model: nn.Module, what: str) -> nn.Sequential:
    """``model.blocks`` of a timm VisionTransformer, checked to be a sequence of plain timm Blocks.

    ``what`` names the transform in the error message.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise VitkitError(
            f"{what} needs a timm VisionTransformer (model.blocks = a sequence of Blocks); "
            f"{type(model).__name__} has none"
        )
    for i, blk in enumerate(blocks):
        if type(blk) is not Block:
            kind = (
                f"already a {type(blk).__name__} (another block transform was applied)"
                if isinstance(blk, Block)
                else f"a {type(blk).__name__}, not a timm Block"
            )
            raise VitkitError(f"{what}: block {i} of {type(model).__name__} is {kind}")
        if not isinstance(blk.attn, VitkitAttention):
            raise VitkitError(
                f"{what}: block {i} attention is {type(blk.attn).__name__}; build the model with "
                "vitkit.create_model (or vitkit.models.use_vitkit_attention) first"
            )
    return blocks


def all_blocks(model: nn.Module) -> list[Block]:
    """Every timm ``Block`` (including vitkit's wrapped subclasses) in forward order."""
    return [m for m in model.modules() if isinstance(m, Block)]


def parse_int_list(text: str | list[int] | tuple[int, ...] | None, field: str) -> list[int]:
    """``"3,6,9"`` or ``[3, 6, 9]`` -> ``[3, 6, 9]``; one-line error naming ``field`` otherwise."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        return [int(t) for t in items]
    except (TypeError, ValueError) as e:
        raise VitkitError(f"{field}: expected comma-separated integers such as 3,6,9, got '{text}'") from e

"""Forward FLOPs of a model for one image (torch's FlopCounterMode, attention counted in full)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitkit.models.attention import VitkitAttention


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs for one image, by torch's FlopCounterMode (matmuls/convs; 2 per multiply-add).

    FlopCounterMode has no formula for the CPU fused-attention kernel, so attention runs its explicit
    path while counting (vitkit's ``force_unfused``, timm's ``fused_attn``); otherwise the N² attention
    matmuls would be missing from the count."""
    saved = []
    for m in model.modules():
        if isinstance(m, VitkitAttention):
            saved.append((m, "force_unfused", m.force_unfused))
            m.force_unfused = True
        elif isinstance(getattr(m, "fused_attn", None), bool):
            saved.append((m, "fused_attn", m.fused_attn))
            m.fused_attn = False
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(example[:1])
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)
    return int(counter.get_total_flops())

"""Pruning: structured (heads + MLP channels: a smaller dense model, real speed), LPViT
(block-structured masks for a FLOPs budget, power-aware) and DIMAP (data-free module-aware
unstructured masks). Masked models report sparsity and FLOPs, not CPU latency (no sparse kernel)."""

from vitkit.compress.prune.dimap import DIMAPConfig, apply_dimap, module_scores, replay_dimap
from vitkit.compress.prune.lpvit import LPViTConfig, apply_lpvit, is_tile_constant, replay_lpvit
from vitkit.compress.prune.masked import MaskedLinear, prunable_linears, sparsity_report
from vitkit.compress.prune.structured import (
    StructuredPruneConfig,
    apply_structured_prune,
    replay_structured_prune,
)

__all__ = [
    "DIMAPConfig",
    "LPViTConfig",
    "MaskedLinear",
    "StructuredPruneConfig",
    "apply_dimap",
    "apply_lpvit",
    "apply_structured_prune",
    "is_tile_constant",
    "module_scores",
    "prunable_linears",
    "replay_dimap",
    "replay_lpvit",
    "replay_structured_prune",
    "sparsity_report",
]

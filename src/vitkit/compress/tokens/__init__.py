"""Token reduction: EViT (keep the attended tokens, fuse the rest) and ToMe (merge similar tokens)."""

from vitkit.compress.tokens.evit import (
    EViTBlock,
    EViTConfig,
    KeepRateSchedule,
    apply_evit,
    replay_evit,
    scheduled_keep_rate,
    set_keep_rate,
)
from vitkit.compress.tokens.tome import (
    ToMeBlock,
    ToMeConfig,
    ToMeState,
    apply_tome,
    bipartite_soft_matching,
    replay_tome,
)

__all__ = [
    "EViTBlock",
    "EViTConfig",
    "KeepRateSchedule",
    "ToMeBlock",
    "ToMeConfig",
    "ToMeState",
    "apply_evit",
    "apply_tome",
    "bipartite_soft_matching",
    "replay_evit",
    "replay_tome",
    "scheduled_keep_rate",
    "set_keep_rate",
]

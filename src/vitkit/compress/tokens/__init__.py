"""Token reduction: EViT (keep the attended tokens, fuse the rest), ToMe (merge similar tokens) and PVC
(finer patches, then 2x2 window merges)."""

from vitkit.compress.tokens.evit import (
    EViTBlock,
    EViTConfig,
    KeepRateSchedule,
    apply_evit,
    replay_evit,
    scheduled_keep_rate,
    set_keep_rate,
)
from vitkit.compress.tokens.pvc import PVCConfig, WTCBlock, apply_pvc, replay_pvc, window_merge
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
    "PVCConfig",
    "ToMeBlock",
    "ToMeConfig",
    "ToMeState",
    "WTCBlock",
    "apply_evit",
    "apply_pvc",
    "apply_tome",
    "bipartite_soft_matching",
    "replay_evit",
    "replay_pvc",
    "replay_tome",
    "scheduled_keep_rate",
    "set_keep_rate",
    "window_merge",
]

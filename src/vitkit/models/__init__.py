"""Models: timm's factory, vitkit presets, the unfused attention module and the manifest."""

from vitkit.models.attention import (
    AttentionMaps,
    AttentionState,
    MatMul,
    Softmax,
    VitkitAttention,
    attention_maps,
    attention_modules,
    logit_hook,
    use_vitkit_attention,
)
from vitkit.models.factory import (
    count_parameters,
    create_model,
    final_norm,
    model_input_size,
    model_normalization,
    num_prefix_tokens,
)
from vitkit.models.manifest import (
    Manifest,
    TransformRecord,
    get_manifest,
    model_name,
    record_transform,
    set_manifest,
)
from vitkit.models.tokens import TokenStep, TokenTapMixin, token_reduction_blocks, token_reduction_trace

__all__ = [
    "AttentionMaps",
    "AttentionState",
    "Manifest",
    "MatMul",
    "Softmax",
    "TokenStep",
    "TokenTapMixin",
    "TransformRecord",
    "VitkitAttention",
    "attention_maps",
    "attention_modules",
    "count_parameters",
    "create_model",
    "final_norm",
    "get_manifest",
    "logit_hook",
    "model_input_size",
    "model_name",
    "model_normalization",
    "num_prefix_tokens",
    "record_transform",
    "set_manifest",
    "token_reduction_blocks",
    "token_reduction_trace",
    "use_vitkit_attention",
]

"""Weight masks for (semi-)unstructured pruning: :class:`MaskedLinear` and what both LPViT and DIMAP
share (which layers are prunable, the FLOPs a mask saves, the replay).

Masked dense matmuls are NOT faster on a CPU (there is no block-sparse or sparse kernel behind
them): a masked model is reported by its sparsity and the FLOPs a sparse kernel would need, never
by a latency gain it does not have. The mask is a buffer, so fine-tuning cannot revive pruned
weights and ``vitkit.load`` restores it from ``model.safetensors``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.compress._blocks import all_blocks
from vitkit.errors import VitkitError


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``weight_mask`` buffer."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("weight_mask", torch.ones_like(linear.weight))
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.weight_mask, self.bias)

    def extra_repr(self) -> str:
        density = self.weight_mask.float().mean().item()
        return f"{super().extra_repr()}, density={density:.3f}"


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears inside the transformer blocks (attention qkv/proj, MLP fc1/fc2), named by block.

    Patch embedding, classifier and exit heads stay dense."""
    out = []
    for i, blk in enumerate(all_blocks(model)):
        for part, attr in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
            lin = getattr(getattr(blk, part, None), attr, None)
            if isinstance(lin, nn.Linear):
                out.append((f"blocks.{i}.{part}.{attr}", lin))
    if not out:
        raise VitkitError(f"{type(model).__name__} has no transformer-block linears to prune")
    return out


def use_masked_linears(model: nn.Module) -> list[tuple[str, MaskedLinear]]:
    """Swap every prunable linear for a :class:`MaskedLinear` (mask of ones); returns them."""
    for blk in all_blocks(model):
        for part, attr in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
            parent = getattr(blk, part, None)
            lin = getattr(parent, attr, None)
            if type(lin) is nn.Linear:
                setattr(parent, attr, MaskedLinear(lin))
    return [(n, m) for n, m in prunable_linears(model) if isinstance(m, MaskedLinear)]


def token_counts(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Rows each prunable linear multiplies per image (tokens), measured with forward hooks."""
    counts: dict[str, int] = {}
    handles = []
    for name, lin in prunable_linears(model):

        def hook(mod, inputs, output, name=name):
            counts[name] = inputs[0].numel() // inputs[0].shape[-1]

        handles.append(lin.register_forward_hook(hook))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    return counts


def sparsity_report(model: nn.Module, input_shape: tuple[int, int, int]) -> dict:
    """Weight sparsity of the block linears and the FLOPs a sparse kernel would need.

    ``dense_flops``: the whole model (torch's FlopCounterMode, 2 per multiply-add);
    ``sparse_flops``: the same minus 2 × tokens for every masked-out weight."""
    from vitkit.models.flops import count_flops

    counts = token_counts(model, input_shape)
    total = zeros = saved = 0
    layers = {}
    for name, lin in prunable_linears(model):
        mask = getattr(lin, "weight_mask", None)
        z = int((mask == 0).sum()) if mask is not None else 0
        total += lin.weight.numel()
        zeros += z
        saved += 2 * counts.get(name, 0) * z
        layers[name] = round(z / lin.weight.numel(), 4)
    dense = count_flops(model, torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    return {
        "sparsity": zeros / max(total, 1),
        "prunable_weights": total,
        "dense_flops": dense,
        "sparse_flops": dense - saved,
        "flops_fraction": (dense - saved) / dense,
        "layer_sparsity": layers,
    }

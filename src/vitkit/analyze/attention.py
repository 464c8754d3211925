"""Attention maps for any layer and head, attention rollout, and image overlays.

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021) — attention maps of the
class token; Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020) — rollout:
``Â_l = ½(mean_heads A_l + I)`` renormalised per row, ``R = Â_L ⋯ Â_1``.

What it changes: nothing; probabilities come from :func:`vitkit.models.attention_maps` (taps on the
unfused attention module, removed on exit). Prefix tokens are handled with ``num_prefix_tokens``:
the map shown is the attention of a query token (the class token by default, or the distillation
token) to the *patch* tokens only; attention given to prefix tokens (class, distillation, registers)
is reported separately as ``prefix_share``. Models without prefix tokens (global average pooling)
show the mean over query tokens.

Token-reduced models (EViT, ToMe): the maps of a block that runs on fewer tokens are drawn on the
original grid (a token's attention shared equally among the patches it holds) and the rollout goes
through each reduction (see :mod:`vitkit.analyze.tokens`, which also draws the kept / merged
patches themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.analyze.common import PixelModel, pixel_transform, subsample, token_grid
from vitkit.analyze.tokens import follow_steps, token_maps_to_grid, token_rollout_matrix
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import attention_maps, attention_modules, num_prefix_tokens, token_reduction_trace


def rollout(
    maps: list[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    reductions: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention rollout over ``maps`` (each (B, H, N, N), first layer first) → (B, N, N0).

    ``head_fusion``: mean | max | min over heads. ``discard_ratio`` zeroes that fraction of the lowest
    fused weights per row (as in the popular vit-explain implementation; 0 = Abnar & Zuidema).
    ``reductions``: for token-reduced models, ``{layer: M}`` with M (B, N_out, N_in) applied after
    that layer (:func:`vitkit.analyze.tokens.token_rollout_matrix`), so N may shrink with depth.
    """
    if not maps:
        raise VitkitError("attention rollout needs at least one layer")
    b, _, n0, _ = maps[0].shape
    result = torch.eye(n0, dtype=torch.float64).expand(b, n0, n0).clone()
    for i, a in enumerate(maps):
        n = a.shape[-1]
        eye = torch.eye(n, dtype=torch.float64).expand(b, n, n)
        a = a.to(torch.float64)
        if head_fusion == "mean":
            fused = a.mean(1)
        elif head_fusion == "max":
            fused = a.amax(1)
        elif head_fusion == "min":
            fused = a.amin(1)
        else:
            raise VitkitError(f"head_fusion must be mean, max or min, got '{head_fusion}'")
        if discard_ratio > 0:
            k = int(n * discard_ratio)
            if k:
                low = fused.topk(k, dim=-1, largest=False).indices
                fused = fused.scatter(-1, low, 0.0)
        fused = 0.5 * (fused + eye)
        fused = fused / fused.sum(-1, keepdim=True)
        result = fused @ result
        if reductions and i in reductions:
            result = reductions[i].to(torch.float64) @ result
    return result


def query_to_patches(attn: torch.Tensor, num_prefix: int, query: int = 0) -> torch.Tensor:
    """(B, ..., N, N) → (B, ..., N_patches): row ``query`` (a prefix token) restricted to patch columns,
    or, without prefix tokens, the mean attention each patch receives."""
    if num_prefix == 0:
        return attn.mean(-2)
    if not 0 <= query < num_prefix:
        raise VitkitError(f"query token {query} is not a prefix token (the model has {num_prefix})")
    return attn[..., query, num_prefix:]


@dataclass
class AttentionConfig:
    layers: tuple[int, ...] = (-1,)  # negative counts from the end
    heads: str = "mean"  # "mean", "all" or a comma list such as "0,2"
    rollout: bool = True
    query: int = 0  # which prefix token looks (0 = class token; 1 = distillation token in DeiT)
    n: int = 8
    seed: int = 0


@dataclass
class AttentionResult:
    """Per layer: the patch-attention maps (B, heads or 1, gh, gw), entropy and prefix share."""

    grid: tuple[int, int]
    num_prefix_tokens: int
    layers: list[int]
    heads: list[int] | str
    maps: dict[int, torch.Tensor]
    rollout: torch.Tensor | None
    images: torch.Tensor  # (B, C, H, W) in [0, 1]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "layers": self.layers,
            "heads": self.heads,
            "n_images": len(self.images),
            "stats": self.stats,
        }


def _heads(spec: str, num_heads: int) -> list[int] | str:
    if spec in ("mean", "all"):
        return spec
    try:
        hs = [int(h) for h in spec.split(",") if h.strip()]
    except ValueError as e:
        raise VitkitError(f"heads must be 'mean', 'all' or a comma list of head indices, got '{spec}'") from e
    bad = [h for h in hs if not 0 <= h < num_heads]
    if bad or not hs:
        raise VitkitError(f"head {bad[0] if bad else spec} does not exist: the model has {num_heads} heads")
    return hs


@torch.no_grad()
def measure_attention(
    model: nn.Module,
    data: ImageDataset,
    cfg: AttentionConfig | None = None,
    device: str | torch.device = "cpu",
) -> AttentionResult:
    """Attention of the chosen query token to the patches, for ``cfg.n`` images, layers and heads."""
    cfg = cfg or AttentionConfig()
    model = model.to(device).eval()
    mods = attention_modules(model)
    if not mods:
        raise VitkitError(
            "attention maps need vitkit attention modules (load a run or use vitkit.create_model)"
        )
    depth = len(mods)
    layers = sorted({li if li >= 0 else depth + li for li in cfg.layers})
    bad = [li for li in layers if not 0 <= li < depth]
    if bad:
        raise VitkitError(f"attention layer {bad[0]} does not exist: the model has {depth} layers")
    grid = token_grid(model)
    npfx = num_prefix_tokens(model)
    heads = _heads(cfg.heads, mods[0].num_heads)
    data = subsample(data, cfg.n, cfg.seed)
    x = pixel_transform(model)(data.images, data.targets)[0].to(device)
    pm = PixelModel(model).to(device)
    wanted = list(range(depth)) if cfg.rollout else layers
    with attention_maps(model, wanted) as rec, token_reduction_trace(model) as steps:
        pm(x)
    # token-reduced models: the token state each layer's attention ran on (None = all patches)
    states = follow_steps(steps, grid[0] * grid[1])
    state_at = {li: next((s for s in reversed(states) if s.block < li), None) for li in range(depth)}
    maps: dict[int, torch.Tensor] = {}
    stats: dict[str, Any] = {"per_layer": {}}
    if states:
        stats["token_reduction_blocks"] = [s.block for s in states]
    for li in layers:
        a = rec[li]  # (B, H, N, N)
        q = token_maps_to_grid(query_to_patches(a, npfx, cfg.query), state_at[li])  # (B, H, P)
        if heads == "mean":
            sel = q.mean(1, keepdim=True)
        elif heads == "all":
            sel = q
        else:
            sel = q[:, heads]
        maps[li] = sel.reshape(sel.shape[0], sel.shape[1], *grid)
        p = a.clamp_min(1e-12)
        entropy = float(-(p * p.log()).sum(-1).mean())
        prefix_share = float(a[..., npfx:, :npfx].sum(-1).mean()) if npfx else 0.0
        stats["per_layer"][li] = {
            "mean_entropy_nats": entropy,
            "max_entropy_nats": float(np.log(a.shape[-1])),
            "patch_to_prefix_share": prefix_share,
        }
    roll = None
    if cfg.rollout:
        reductions, size = {}, None
        for (li, step), state in zip(steps, states):
            reductions[li] = token_rollout_matrix(step, npfx, size_in=size)
            size = state.size
        r = rollout([rec[i] for i in range(depth)], reductions=reductions)
        roll = query_to_patches(r, npfx, cfg.query).reshape(len(x), *grid).float()
    return AttentionResult(grid, npfx, layers, heads, maps, roll, x.cpu(), stats)


def _upsample(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    m = m[None, None].float()
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0]
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    return m.numpy()


def plot_attention(result: AttentionResult, path, max_images: int = 8) -> None:
    """Rows = images; columns = the image, each (layer, head) map overlaid, and the rollout."""
    from vitkit.analyze.common import pyplot, save_figure

    plt = pyplot()
    imgs = result.images[:max_images]
    cols: list[tuple[str, Any]] = []
    for li in result.layers:
        m = result.maps[li]
        for h in range(m.shape[1]):
            label = f"L{li} " + (
                "mean" if result.heads == "mean" else f"h{h if result.heads == 'all' else result.heads[h]}"
            )
            cols.append((label, m[:, h]))
    if result.rollout is not None:
        cols.append(("rollout", result.rollout))
    ncol = 1 + len(cols)
    fig, axes = plt.subplots(len(imgs), ncol, figsize=(1.6 * ncol, 1.6 * len(imgs)), squeeze=False)
    size = tuple(imgs.shape[-2:])
    for r, img in enumerate(imgs):
        rgb = img.permute(1, 2, 0).numpy()
        rgb = rgb[..., 0] if rgb.shape[-1] == 1 else rgb
        axes[r, 0].imshow(rgb, cmap="gray" if rgb.ndim == 2 else None)
        for c, (label, maps) in enumerate(cols, start=1):
            axes[r, c].imshow(rgb, cmap="gray" if rgb.ndim == 2 else None)
            axes[r, c].imshow(_upsample(maps[r], size), cmap="jet", alpha=0.5)
            if r == 0:
                axes[r, c].set_title(label, fontsize=7)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    save_figure(fig, path)


def attention_json(result: AttentionResult) -> dict[str, Any]:
    d = result.to_dict()
    d["maps"] = {str(k): v.tolist() for k, v in result.maps.items()}
    if result.rollout is not None:
        d["rollout"] = result.rollout.tolist()
    return d


__all__ = [
    "AttentionConfig",
    "AttentionResult",
    "attention_json",
    "measure_attention",
    "plot_attention",
    "query_to_patches",
    "rollout",
]

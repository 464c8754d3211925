"""Which patches a token-reduced ViT kept, fused or merged, block by block, drawn on the input grid.

Papers: EViT — Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via
Token Reorganizations" (ICLR 2022), whose figures show the kept vs fused patches per reduction
stage; ToMe — Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023), whose figures colour
the patches that ended up in the same merged token.

What it changes: nothing. The EViT / ToMe blocks report every reduction to
:func:`vitkit.models.token_reduction_trace` (a tap removed on exit); this module follows each
original patch through the steps:

* EViT (``kind="keep"``): per reduction block, every patch is ``kept`` (its own token survives),
  ``fused`` (its token went into the extra fused token, in this block or an earlier one; a fused
  token that is kept later stays "fused") or ``dropped`` (``fuse=False``);
* ToMe (``kind="merge"``): per block, the output token each patch is now part of (its merge group)
  and the groups' sizes (equal to ToMe's own size tensor).

Prefix tokens (cls, dist, registers) are never reduced by these transforms and are not drawn.
:func:`token_maps_to_grid` and :func:`token_rollout_matrix` let :mod:`vitkit.analyze.attention` show
attention and rollout of a token-reduced model on the original grid (our own bookkeeping: attention
to a token is shared equally among the patches it holds; a merged or fused token's rollout row is
the weighted average of its sources, weights renormalized to sum to 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitkit.analyze.common import PixelModel, pixel_transform, subsample
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import TokenStep, num_prefix_tokens, token_reduction_blocks, token_reduction_trace

KEPT, FUSED, DROPPED = 0, 1, 2
STATUS_NAMES = {KEPT: "kept", FUSED: "fused", DROPPED: "dropped"}


@dataclass
class TokenReductionConfig:
    n: int = 8
    seed: int = 0


@dataclass
class BlockTokens:
    """The state after one reduction block, for every image.

    ``token`` (B, N0): index (among non-prefix tokens) of the token holding each original patch, -1 if
    dropped. ``size`` (B, n_out): original patches per output token. ``status`` (B, N0): KEPT / FUSED
    / DROPPED (EViT; all KEPT for ToMe). ``n_kept_tokens``: tokens the block kept (EViT) or produced.
    """

    block: int
    kind: str
    n_in: int
    n_out: int
    n_kept_tokens: int
    token: torch.Tensor
    size: torch.Tensor
    status: torch.Tensor
    scores: torch.Tensor | None = None  # EViT: class-token attention of the block's input tokens
    source: torch.Tensor | None = None  # ToMe: the transform's own patch -> token map

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "block": self.block,
            "kind": self.kind,
            "tokens_in": self.n_in,
            "tokens_out": self.n_out,
            "kept_tokens": self.n_kept_tokens,
        }
        if self.kind == "keep":
            for code, name in STATUS_NAMES.items():
                d[f"mean_{name}_patches"] = float((self.status == code).sum(1).float().mean())
        else:
            d["mean_largest_group"] = float(self.size.amax(1).float().mean())
            d["mean_merged_groups"] = float((self.size > 1).sum(1).float().mean())
        return d


@dataclass
class TokenReductionResult:
    grid: tuple[int, int]
    num_prefix_tokens: int
    blocks: list[BlockTokens]
    images: torch.Tensor  # (B, C, H, W) in [0, 1]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        gh, gw = self.grid
        out = []
        for b in self.blocks:
            d = b.summary()
            if b.kind == "keep":
                d["status"] = [s.reshape(gh, gw).tolist() for s in b.status]
                d["status_codes"] = {str(k): v for k, v in STATUS_NAMES.items()}
            else:
                d["group"] = [t.reshape(gh, gw).tolist() for t in b.token]
                d["group_size"] = b.size.tolist()
            out.append(d)
        return {
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "prefix_tokens": "never reduced (always kept, not drawn)",
            "n_images": len(self.images),
            "blocks": out,
            "stats": self.stats,
        }


def follow_steps(steps: list[tuple[int, TokenStep]], n_patches: int) -> list[BlockTokens]:
    """Compose the steps recorded during ONE forward (in block order) into the per-block state of
    every original patch; steps of several forwards must be split first."""
    out: list[BlockTokens] = []
    token: torch.Tensor | None = None  # (B, N0) current token of each patch
    fused_tok: torch.Tensor | None = None  # (B, n_cur) True for tokens that are (or hold) a fused token
    for block, s in steps:
        if token is None:
            B = (s.kept if s.kept is not None else s.dest).shape[0]
            dev = (s.kept if s.kept is not None else s.dest).device
            token = torch.arange(n_patches, device=dev).expand(B, -1).clone()
            fused_tok = torch.zeros(B, n_patches, dtype=torch.bool, device=dev)
        if s.n_in != fused_tok.shape[1]:
            raise VitkitError(
                f"token trace: block {block} saw {s.n_in} tokens but {fused_tok.shape[1]} were expected"
            )
        B = token.shape[0]
        if s.kind == "keep":
            k = s.kept.shape[1]
            new_index = torch.full((B, s.n_in), -1, dtype=torch.long, device=token.device)
            new_index.scatter_(1, s.kept, torch.arange(k, device=token.device).expand(B, -1))
            new_fused = fused_tok.gather(1, s.kept)
            if s.fused and s.n_out > k:
                new_index = torch.where(new_index < 0, torch.full_like(new_index, k), new_index)
                new_fused = torch.cat([new_fused, new_fused.new_ones(B, 1)], 1)
            n_kept = k
        elif s.kind == "merge":
            new_index = s.dest
            holds_fused = torch.zeros(B, s.n_out, dtype=torch.long, device=token.device)
            new_fused = holds_fused.scatter_add(1, s.dest, fused_tok.to(torch.long)) > 0
            n_kept = s.n_out
        else:
            raise VitkitError(f"token trace: unknown reduction kind '{s.kind}'")
        alive = token >= 0
        token = torch.where(alive, new_index.gather(1, token.clamp_min(0)), token)
        fused_tok = new_fused
        status = torch.full_like(token, DROPPED)
        alive = token >= 0
        is_fused = fused_tok.gather(1, token.clamp_min(0))
        status = torch.where(alive & ~is_fused, torch.full_like(status, KEPT), status)
        status = torch.where(alive & is_fused, torch.full_like(status, FUSED), status)
        size = torch.zeros(B, s.n_out, dtype=torch.long, device=token.device)
        size.scatter_add_(1, token.clamp_min(0), alive.to(torch.long))
        out.append(
            BlockTokens(block, s.kind, s.n_in, s.n_out, n_kept, token, size, status, s.scores, s.source)
        )
    return out


def token_maps_to_grid(values: torch.Tensor, state: BlockTokens | None) -> torch.Tensor:
    """(..., n_tokens) values over the *current* non-prefix tokens → (..., N0) over original patches:
    each patch gets its token's value divided by the token's size (0 for dropped patches)."""
    if state is None:
        return values
    B = state.token.shape[0]
    lead = values.shape[1:-1]
    idx = state.token.clamp_min(0).view(B, *([1] * len(lead)), -1).expand(B, *lead, -1)
    per = values.gather(-1, idx)
    size = state.size.gather(1, state.token.clamp_min(0)).clamp_min(1).to(values.dtype)
    keep = (state.token >= 0).to(values.dtype)
    shape = (B, *([1] * len(lead)), -1)
    return per / size.view(shape) * keep.view(shape)


def token_rollout_matrix(
    step: TokenStep, num_prefix: int, size_in: torch.Tensor | None = None, dtype=torch.float64
) -> torch.Tensor:
    """(B, P + n_out, P + n_in): how each output token (prefix included) averages the block's input
    tokens: prefix identity; kept token = itself; fused / merged token = weighted mean of its
    sources (EViT: class-attention weights, ToMe: the input tokens' sizes ``size_in`` (B, n_in),
    ones when None), rows summing to 1."""
    P = num_prefix
    src = step.kept if step.kept is not None else step.dest
    B, dev = src.shape[0], src.device
    M = torch.zeros(B, P + step.n_out, P + step.n_in, dtype=dtype, device=dev)
    M[:, :P, :P] = torch.eye(P, dtype=dtype, device=dev)
    rows = torch.arange(B, device=dev)[:, None]
    if step.kind == "keep":
        k = step.kept.shape[1]
        M[rows, P + torch.arange(k, device=dev)[None], P + step.kept] = 1.0
        if step.fused and step.n_out > k:
            w = step.scores.to(dtype).clone()
            w.scatter_(1, step.kept, 0.0)
            w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
            M[:, P + k, P:] = w
    else:
        w = torch.ones(B, step.n_in, dtype=dtype, device=dev) if size_in is None else size_in.to(dtype)
        M[rows, P + step.dest, P + torch.arange(step.n_in, device=dev)[None]] = w
        M[:, P:, P:] = M[:, P:, P:] / M[:, P:, P:].sum(-1, keepdim=True).clamp_min(1e-12)
    return M


def has_token_reduction(model: nn.Module) -> bool:
    return bool(token_reduction_blocks(model))


@torch.no_grad()
def measure_token_reduction(
    model: nn.Module,
    data: ImageDataset,
    cfg: TokenReductionConfig | None = None,
    device: str | torch.device = "cpu",
) -> TokenReductionResult:
    """Kept / fused (EViT) or merged (ToMe) patches of ``cfg.n`` images after every reduction block."""
    from vitkit.analyze.common import token_grid

    cfg = cfg or TokenReductionConfig()
    model = model.to(device).eval()
    if not has_token_reduction(model):
        raise VitkitError(
            "the model has no token-reduction blocks (apply EViT or ToMe, or load a run that carries them)"
        )
    grid = token_grid(model)
    data = subsample(data, cfg.n, cfg.seed)
    x = pixel_transform(model)(data.images, data.targets)[0].to(device)
    with token_reduction_trace(model) as steps:
        PixelModel(model).to(device)(x)
    blocks = follow_steps(steps, grid[0] * grid[1])
    stats = {"per_block": {str(b.block): b.summary() for b in blocks}}
    return TokenReductionResult(grid, num_prefix_tokens(model), blocks, x.cpu(), stats)


def plot_token_reduction(result: TokenReductionResult, path, max_images: int = 8) -> None:
    """Rows = images; columns = the image, then one panel per reduction block. EViT: fused patches
    tinted blue, dropped ones black; ToMe: one colour per merged group (patches left alone: none)."""
    import numpy as np

    from vitkit.analyze.common import pyplot, save_figure

    plt = pyplot()
    imgs = result.images[:max_images]
    gh, gw = result.grid
    ncol = 1 + len(result.blocks)
    fig, axes = plt.subplots(len(imgs), ncol, figsize=(1.6 * ncol, 1.6 * len(imgs)), squeeze=False)
    H, W = imgs.shape[-2:]
    cmap = plt.get_cmap("tab20")
    for r, img in enumerate(imgs):
        rgb = img.permute(1, 2, 0).numpy()
        rgb = np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb
        axes[r, 0].imshow(rgb)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
        for c, b in enumerate(result.blocks, start=1):
            over = np.zeros((gh, gw, 4))
            if b.kind == "keep":
                st = b.status[r].reshape(gh, gw).numpy()
                over[st == FUSED] = (0.1, 0.3, 0.9, 0.65)
                over[st == DROPPED] = (0, 0, 0, 0.9)
                title = f"B{b.block}: keep {b.n_kept_tokens}/{b.n_in}"
            else:
                tok = b.token[r].reshape(gh, gw).numpy()
                size = b.size[r].numpy()
                for g in np.unique(tok):
                    if size[g] > 1:
                        over[tok == g] = (*cmap(int(g) % 20)[:3], 0.6)
                title = f"B{b.block}: {b.n_in}→{b.n_out} tokens"
            axes[r, c].imshow(rgb)
            axes[r, c].imshow(over, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    kinds = {b.kind for b in result.blocks}
    legend = []
    if "keep" in kinds:
        legend.append("EViT: blue = fused into the extra token, black = dropped, clear = kept")
    if "merge" in kinds:
        legend.append("ToMe: one colour per merged group, clear = not merged")
    # just above the first row (the default position floats far above tall figures)
    fig.suptitle("; ".join(legend), fontsize=7, y=axes[0, 0].get_position().y1 + 0.3 / fig.get_figheight())
    save_figure(fig, path)


def token_reduction_json(result: TokenReductionResult) -> dict[str, Any]:
    return result.to_dict()


__all__ = [
    "BlockTokens",
    "TokenReductionConfig",
    "TokenReductionResult",
    "follow_steps",
    "has_token_reduction",
    "measure_token_reduction",
    "plot_token_reduction",
    "token_maps_to_grid",
    "token_reduction_json",
    "token_rollout_matrix",
]

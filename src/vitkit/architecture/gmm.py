"""Gaussian mixture mask (GMM) attention.

Paper: Lee & Lee, "Toward a Deeper Understanding: RetNet Viewed through Convolution" (2023; Pattern
Recognition 2024), code: CatworldLee/Gaussian-Mixture-Mask-Attention (``models/gmm.py``).

What it changes: every attention layer gets, per head h, K learnable Gaussians on the patch-grid
distance d_ij (2 parameters each: width σ and amplitude α); their sum

    W_h[i, j] = Σ_k α_{k,h} · exp(-d_ij² / (2 (σ_{k,h}² + 1e-5)))

is applied to the attention logits. **The paper's README says the mask is added, its code multiplies
the logits** (``attn = mask * (q k^T · scale)``): ``form="multiplicative"`` (default) is the code's
form, through :meth:`VitkitAttention.register_logit_hook` (explicit attention path);
``form="additive"`` is the README's, through :meth:`VitkitAttention.register_attn_bias` (the fused
SDPA kernel keeps running). Initialisation as in the code: σ ~ N(10, 10²), α ~ N(0, 2²) (α can be
negative and flip logits; kept faithful).

Where our reading differs from the code (said in docs/smalldata.md too):

* Prefix tokens. The paper's GMM-ViT drops the CLS token (mean pooling, no prefix). As a transform
  on any timm ViT we keep every prefix token (``model.num_prefix_tokens``: cls, dist, registers):
  rows and columns of a prefix token are left alone (W = 1 multiplicative, bias = 0 additive), so
  prefix tokens attend and are attended by content only. Use ``model_kwargs: {class_token: false,
  global_pool: avg}`` for the paper's prefix-free layout.
* d_ij is computed per layer from ``model.patch_embed.grid_size`` (rectangular grids allowed).

Limit behaviours (tested in tests/architecture/test_gmm.py):

| masks                     | multiplicative (default)                      | additive                          |
|---------------------------|-----------------------------------------------|-----------------------------------|
| flat (σ → ∞), Σα = s > 0  | patch logits scaled by s (a temperature): per | constant bias on patch keys; with |
|                           | query, the ranking of the patch keys equals   | no prefix tokens (or s = 0) the   |
|                           | the plain model's (prefix logits keep scale 1,| output is the plain model's       |
|                           | so the CLS key may move); s = 1 → identical   |                                   |
| zero width (σ = 0)        | W = s·I: every off-diagonal patch logit is 0, | bias = s·I: only the self logit   |
|                           | so a query ranks all other patches equal      | moves; the ranking of the other   |
|                           | (self vs. uniform); prefix logits untouched   | keys equals the plain model's     |

Parameters: exactly 2·K·heads·depth, in ``attn.gmm`` submodules (saved, loaded and counted).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import (
    VitkitAttention,
    attention_modules,
    model_input_size,
    model_name,
    num_prefix_tokens,
    record_transform,
)
from vitkit.registry import AS_IS, Technique, TrainTransform, parse_config, register

EPS = 1e-5  # the code's ``sigma ** 2 + 1e-5``


class GMMConfig(BaseModel):
    """Options of :func:`apply_gmm` (``--transform gmm:k=5,form=additive``)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(5, ge=1, le=64, description="Gaussian kernels per head (paper: 5)")
    form: Literal["multiplicative", "additive"] = Field(
        "multiplicative", description="multiplicative: the code's form; additive: the README's"
    )


def grid_half_sq_distance(grid: tuple[int, int]) -> torch.Tensor:
    """(P, P) matrix of d²/2 between patch positions of a row-major ``grid`` (timm's flattening)."""
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    return d2.float() / 2


class GaussianMixtureMask(nn.Module):
    """K Gaussian masks per head for one attention layer; callable as a logit hook or a bias hook."""

    def __init__(
        self,
        num_heads: int,
        k: int,
        grid: tuple[int, int],
        num_prefix_tokens: int,
        form: str = "multiplicative",
    ):
        super().__init__()
        self.form = form
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = tuple(grid)
        # shapes (K, H, 1, 1) and init as in the paper's code
        self.sigma = nn.Parameter(torch.randn(k, num_heads, 1, 1) * 10 + 10)
        self.alpha = nn.Parameter(torch.randn(k, num_heads, 1, 1) * 2)
        # derived from the grid, rebuilt on load: not part of the state dict
        self.register_buffer("half_dist2", grid_half_sq_distance(self.grid), persistent=False)

    def mask(self) -> torch.Tensor:
        """W over the patch grid, (heads, P, P)."""
        # exp(-d²/2)^(1/(σ²+ε)) in the code; the same value without a power of a tiny number
        gauss = torch.exp(-self.half_dist2 / (self.sigma**2 + EPS))
        return (self.alpha * gauss).sum(0)

    def full(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """W over all ``n`` tokens, (heads, n, n): prefix rows/columns neutral (1 or 0)."""
        p = self.num_prefix_tokens
        w = self.mask()
        if n != p + w.shape[-1]:
            raise VitkitError(
                f"gmm: the attention saw {n} tokens but the masks cover {p} prefix + {w.shape[-1]} "
                f"patch tokens (grid {self.grid}); was the input size or token count changed after apply_gmm?"
            )
        if p == 0:
            return w.to(dtype)
        neutral = 1.0 if self.form == "multiplicative" else 0.0
        out = w.new_full((w.shape[0], n, n), neutral)
        out[:, p:, p:] = w
        return out.to(dtype)

    def forward(self, attn: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """Multiplicative form (logit hook): logits ⊙ W."""
        return logits * self.full(logits.shape[-1], logits.dtype)

    def bias(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Additive form (bias hook): W as a bias, broadcast over the batch."""
        return self.full(q.shape[-2], q.dtype)

    def extra_repr(self) -> str:
        k, h = self.sigma.shape[:2]
        return f"k={k}, heads={h}, grid={self.grid}, prefix={self.num_prefix_tokens}, form={self.form}"


def gmm_parameter_count(k: int, heads: int, depth: int) -> int:
    """Parameters :func:`apply_gmm` adds: σ and α per kernel, head and layer."""
    return 2 * k * heads * depth


def gmm_masks(model: nn.Module) -> list[GaussianMixtureMask]:
    return [m for m in model.modules() if isinstance(m, GaussianMixtureMask)]


def _tokens_seen(model: nn.Module, mods: list[VitkitAttention]) -> list[int]:
    """Tokens each attention layer sees, from one forward pass on a blank image (eval, no grad)."""
    seen: dict[int, int] = {}
    handles = [
        m.register_tap(lambda s, i=i: seen.setdefault(i, s.q.shape[-2]), needs_probs=False)
        for i, m in enumerate(mods)
    ]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        c, h, w = model_input_size(model)
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, c, h, w, device=p.device, dtype=p.dtype))
    finally:
        for h_ in handles:
            h_.remove()
        for m, mode in modes:
            m.training = mode
    return [seen.get(i, -1) for i in range(len(mods))]


def apply_gmm(model: nn.Module, cfg: GMMConfig | dict | None = None) -> nn.Module:
    """Attach K Gaussian masks per head to every attention layer of a ViT, in place; returns it.

    Needs vitkit attention modules (``vitkit.create_model`` swaps timm's ``Attention``) that see
    exactly the prefix tokens plus the patch grid. Raises :class:`VitkitError` otherwise (a CNN,
    DHVT whose attention also sees head tokens, a model already masked).
    """
    cfg = parse_config(GMMConfig, cfg, "gmm")
    name = model_name(model)
    mods = attention_modules(model)
    if not mods:
        raise VitkitError(
            f"gmm: model '{name}' has no vitkit attention modules; GMM masks need a timm ViT built with "
            "vitkit.create_model (its Attention swapped for VitkitAttention)"
        )
    if any(isinstance(getattr(m, "gmm", None), GaussianMixtureMask) for m in mods):
        raise VitkitError(f"gmm: model '{name}' already has Gaussian mixture masks")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise VitkitError(f"gmm: model '{name}' has no patch_embed.grid_size to measure distances on")
    grid = (int(grid[0]), int(grid[1]))
    prefix = num_prefix_tokens(model)
    expected = prefix + grid[0] * grid[1]
    for i, n in enumerate(_tokens_seen(model, mods)):
        if n != expected:
            raise VitkitError(
                f"gmm: attention layer {i} of '{name}' sees {n} tokens, not the {prefix} prefix + "
                f"{grid[0]}x{grid[1]} patch tokens a grid mask is defined on (e.g. DHVT's head tokens); "
                "this model family cannot take GMM masks"
            )
    device = next(model.parameters()).device
    for m in mods:
        gmm = GaussianMixtureMask(m.num_heads, cfg.k, grid, prefix, cfg.form).to(device)
        m.gmm = gmm  # a submodule: saved, loaded, counted and moved with the model
        if cfg.form == "multiplicative":
            m.register_logit_hook(gmm)
        else:
            m.register_attn_bias(gmm.bias)
    record_transform(model, "gmm", cfg.model_dump())
    return model


def replay_gmm(model: nn.Module, config: dict) -> nn.Module:
    """``vitkit.load``: the same masks (values come from model.safetensors)."""
    return apply_gmm(model, config)


def train_transform(options: dict[str, str]) -> TrainTransform:
    """``vitkit train --transform gmm:k=5,form=additive``."""
    cfg = parse_config(GMMConfig, options, "gmm")
    return TrainTransform(apply=lambda model: apply_gmm(model, cfg))


register(
    Technique(
        name="gmm",
        summary="Gaussian-mixture masks on the attention logits: a locality prior for small data",
        paper='Lee & Lee, "Toward a Deeper Understanding: RetNet Viewed through Convolution" (2023)',
        config=GMMConfig,
        replay=replay_gmm,
        export=AS_IS,
        train=train_transform,
        family="architecture",
        verb="vitkit train --transform gmm:k=5",
    )
)

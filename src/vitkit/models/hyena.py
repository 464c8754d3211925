"""Hyena N-D: attention-free ViTs with a multi-dimensional Hyena token mixer, as timm-registered models.

Paper: Zimerman & Wolf, "Multi-Dimensional Hyena for Spatial Inductive Bias" (AISTATS 2024); code:
Itamarzimm/HyenaND @e8b875e (``pytorch-image-models/timm/models/layers/hyena2d.py``,
``HyenaOperator2d`` and ``HyenaFilter2d``), read and re-implemented here.

The model is timm's ``VisionTransformer`` with no class token and :class:`HyenaOperator2d` in place of
attention, through timm's own ``attn_layer`` extension point (no fork of timm's classes). Per block,
on the square patch grid (L x L tokens, width D, order N = 2 by default):

1. ``in_proj`` D -> (N + 1) D, a depthwise 3x3 convolution (the "short filter"), split into
   ``x_0 .. x_{N-1}`` and ``v``;
2. an implicit long filter per channel from an MLP of positional features: ``z(t) = [t, cos, sin]``
   (a learnable table, as in the code) -> ``Linear(3, 64)``, ``Sin`` (a learnable frequency, one
   module shared by every layer of the filter's MLPs, as in the code), two more ``Linear(64, 64)`` +
   ``Sin``, ``Linear(64, (N - 1) D)`` without bias, times an exponential decay window
   ``exp(-t |delta_c|)`` (delta spaced between log(1e-2) / 1.5 and log(1e-2) / 0.3 over channels);
   ``filter="2d"`` (the README recipe's ``--hyena2d_filter``): one MLP of ``[z(i), z(j)]`` on the
   grid times the product of the row and column windows; ``filter="product"``: a row MLP times a
   column MLP (a rank-1 filter per channel);
3. the recurrence ``v <- v * x_n``, ``v <- conv2d(v, h_n) + b_n * v`` for n = N-1 .. 1, then
   ``y = out_proj(v * x_0)``; the long convolution is a zero-padded 2L x 2L FFT (linear, not
   circular), so output (i, j) sees the inputs (i', j') <= (i, j); ``direction="seq"`` (the
   README recipe) flips the grid around the first long convolution so it sees (i', j') >= (i, j),
   ``"4dir"`` runs the four flips and mixes them with ``Linear(4, 1)``, ``"standard"`` neither.

Differences from the code, on purpose (the paper notes' traps): the FFT convolution is the true
linear convolution (the code's ``fftconv2d`` divides it by 2L: ``k_f / fft_size`` with the default
``irfft2`` norm; a constant the filter's last layer can absorb), tested against ``F.conv2d``; the
classifier reads the mean of the patch tokens (``global_pool="avg"``), not the top-left patch token
the code's DeiT reads (``global_pool="corner"`` keeps that for comparisons); the positional table
is resampled linearly to other grid sizes (the code asserts the training grid), so the model runs at
other resolutions with ``dynamic_img_size=True``. Not implemented: the code's ``parallel`` and
``4dirp`` modes, ``window_mode`` other than ``standard``, direct (explicit) filters, the hybrid
(Hyena blocks then attention blocks).

| name                        | img | patch | dim | depth | mlp | params (10 cls)                 |
|-----------------------------|-----|-------|-----|-------|-----|---------------------------------|
| vitkit_hyena_nano_p4_16     | 16  | 4     | 32  | 2     | 2   | tests                           |
| vitkit_hyena_micro_p4_16    | 16  | 4     | 64  | 4     | 4   | ≈ vitkit_micro_p4_16            |
| vitkit_hyena_tiny_p4_32     | 32  | 4     | 192 | 6     | 2   | ≈ vitkit_tiny_p4_32             |

This module imports nothing of vitkit but :mod:`vitkit.errors` and ``models.pretrained_cfg``: ``vitkit.models`` imports it to
register the models.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models.pretrained_cfg import small_input_cfg

__all__ = ["HyenaOperator2d", "HyenaVisionTransformer", "ImplicitFilter2d", "fft_conv2d", "hyena_layer"]


def fft_conv2d(v: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y[c, i, j] = sum_{i' <= i, j' <= j} v[c, i', j'] k[c, i - i', j - j'] + bias[c] v[c, i, j]`` for
    ``v`` (B, C, L, L) and ``k`` (C, L, L): a linear (zero-padded, not circular) convolution by FFT,
    in float32."""
    L1, L2 = v.shape[-2:]
    size = (2 * L1, 2 * L2)
    y = torch.fft.irfft2(torch.fft.rfft2(v.float(), s=size) * torch.fft.rfft2(k.float(), s=size), s=size)
    return (y[..., :L1, :L2] + v.float() * bias.float()[:, None, None]).to(v.dtype)


class Sin(nn.Module):
    """``sin(freq * x)`` with a learnable frequency per feature (the Hyena filter's activation)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


def positional_features(emb_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's ``PositionalEmbedding``: ``z`` (1, L, emb_dim) = [t, Re, Im of exp(-i f w)] and
    ``t`` (1, L, 1) = linspace(0, 1, L)."""
    t = torch.linspace(0, 1, length)[None, :, None]
    bands = (emb_dim - 1) // 2
    w = 2 * math.pi * torch.linspace(0, length - 1, length)[None, :, None] / length
    f = torch.linspace(1e-4, bands - 1, bands)[None, None]
    z = torch.exp(-1j * f * w)
    return torch.cat([t, z.real, z.imag], dim=-1), t


class ImplicitFilter2d(nn.Module):
    """Hyena N-D's implicit long filters for ``channels`` channels on an L x L grid (module docstring)."""

    def __init__(
        self,
        channels: int,
        l_max: int,
        width: int = 64,
        emb_dim: int = 3,
        inner_layers: int = 2,
        filter: Literal["2d", "product"] = "2d",
        fast_decay: float = 0.3,
        slow_decay: float = 1.5,
        target: float = 1e-2,
    ):
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise VitkitError(f"Hyena filter emb_dim must be odd and >= 3 (time, cos, sin), got {emb_dim}")
        self.kind = filter
        self.l_max = l_max
        self.act = Sin(width)  # one module in every layer of both MLPs, as the code's ``act``
        z, _ = positional_features(emb_dim, l_max)
        self.z = nn.Parameter(z)  # learnable in the code too (registered with its own small lr)
        deltas = torch.linspace(math.log(target) / slow_decay, math.log(target) / fast_decay, channels)
        self.register_buffer("deltas", deltas[None, None], persistent=False)

        def mlp(inputs: int) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Linear(inputs, width), self.act]
            for _ in range(inner_layers):
                layers += [nn.Linear(width, width), self.act]
            return nn.Sequential(*layers, nn.Linear(width, channels, bias=False))

        if filter == "2d":
            self.mlp = mlp(2 * emb_dim)
        elif filter == "product":
            self.mlp_rows, self.mlp_cols = mlp(emb_dim), mlp(emb_dim)
        else:
            raise VitkitError(f"Hyena filter must be '2d' or 'product', got {filter!r}")
        self.bias = nn.Parameter(torch.randn(channels))

    def features(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and ``t`` for a grid side of ``length``: the learned table, resampled linearly when the
        grid is not the training one."""
        z = self.z
        if length != self.l_max:
            z = F.interpolate(z.transpose(1, 2), size=length, mode="linear", align_corners=True).transpose(
                1, 2
            )
        t = torch.linspace(0, 1, length, device=z.device, dtype=z.dtype)[None, :, None]
        return z, t

    def forward(self, length: int) -> torch.Tensor:
        """The filters (channels, L, L)."""
        z, t = self.features(length)
        decay = torch.exp(-t * self.deltas.abs())  # (1, L, C): the window along one axis
        if self.kind == "2d":
            grid = torch.cat(
                [z[0][:, None].expand(-1, length, -1), z[0][None].expand(length, -1, -1)], dim=-1
            )
            h = self.mlp(grid) * (decay[0][:, None] * decay[0][None])  # (L, L, C)
        else:
            rows, cols = self.mlp_rows(z)[0] * decay[0], self.mlp_cols(z)[0] * decay[0]  # (L, C) each
            h = rows[:, None] * cols[None]
        return h.permute(2, 0, 1)


class HyenaOperator2d(nn.Module):
    """The Hyena N-D token mixer on (B, L*L, D) tokens of a square grid (module docstring); takes
    the arguments timm passes an ``attn_layer`` and ignores those of attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        l_max: int,
        order: int = 2,
        filter_width: int = 64,
        filter: Literal["2d", "product"] = "2d",
        direction: Literal["seq", "standard", "4dir"] = "seq",
        dropout: float = 0.0,
        proj_drop: float = 0.0,
        **_: Any,
    ):
        super().__init__()
        if order < 2:
            raise VitkitError(f"Hyena order must be >= 2, got {order}")
        if direction not in ("seq", "standard", "4dir"):
            raise VitkitError(f"Hyena direction must be seq, standard or 4dir, got {direction!r}")
        self.dim, self.order, self.direction = dim, order, direction
        inner = dim * (order + 1)
        self.in_proj = nn.Linear(dim, inner)
        self.short_filter = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.filter_fn = ImplicitFilter2d(dim * (order - 1), l_max, width=filter_width, filter=filter)
        self.mix = nn.Linear(4, 1) if direction == "4dir" else None
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitkitError("Hyena N-D mixes a token grid by convolution; it takes no attention mask")
        B, N, D = x.shape
        L = math.isqrt(N)
        if L * L != N:
            raise VitkitError(
                f"Hyena N-D needs a square patch grid and no prefix tokens; got {N} tokens (class_token=False)"
            )
        u = self.in_proj(x).reshape(B, L, L, -1).permute(0, 3, 1, 2)
        *xs, v = self.short_filter(u).split(D, dim=1)
        k = self.filter_fn(L).reshape(self.order - 1, D, L, L)
        bias = self.filter_fn.bias.reshape(self.order - 1, D)
        views = 4 if self.direction == "4dir" else 1
        if views == 4:  # the code's augment: the grid and its three flips, stacked on the batch
            xs = [_four_flips(t) for t in xs]
            v = _four_flips(v)
        for o, x_i in enumerate(reversed(xs[1:])):
            v = self.dropout(v * x_i)
            flip = self.direction == "seq" and o == 0
            if flip:
                v = v.flip(-1, -2)
            v = fft_conv2d(v, k[o], bias[o])
            if flip:
                v = v.flip(-1, -2)
        y = (v * xs[0]).permute(0, 2, 3, 1)  # (views*B, L, L, D)
        if views == 4:
            y1, y2, y3, y4 = y.split(B)
            y = torch.stack([y1, y2.flip(1, 2), y3.flip(2), y4.flip(1)], dim=-1)
            y = self.mix(y).squeeze(-1)
        return self.proj_drop(self.out_proj(y.reshape(B, N, D)))


@cache
def hyena_layer(l_max: int, **options: Any) -> type[HyenaOperator2d]:
    """:class:`HyenaOperator2d` with the grid side and options bound, as a class: timm's ``Block``
    takes ``attn_layer`` as a class (one per setting, cached, so equal settings share it)."""

    def __init__(self, dim: int, num_heads: int = 1, **kwargs: Any) -> None:
        HyenaOperator2d.__init__(self, dim, num_heads, l_max=l_max, **{**options, **kwargs})

    return type("HyenaOperator2d", (HyenaOperator2d,), {"__init__": __init__, "__module__": __name__})


def _four_flips(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t.flip(-1, -2), t.flip(-1), t.flip(-2)], dim=0)


class HyenaVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` with :class:`HyenaOperator2d` blocks and no class token;
    ``global_pool="corner"`` reads the top-left patch token as the code's DeiT does."""

    onnx_exporter = "dynamo"  # torch's torchscript exporter has no rfft2; the dynamo one writes DFT ops

    def __init__(self, *args: Any, global_pool: str = "avg", **kwargs: Any):
        self._corner = global_pool == "corner"
        super().__init__(*args, global_pool="" if self._corner else global_pool, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        if self._corner and pool_type is None:
            return x[:, self.num_prefix_tokens]
        return super().pool(x, pool_type)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self._corner = global_pool == "corner"
            global_pool = "" if self._corner else global_pool
        super().reset_classifier(num_classes, global_pool)


_cfg = small_input_cfg


default_cfgs = generate_default_cfgs(
    {
        "vitkit_hyena_nano_p4_16": _cfg(16),
        "vitkit_hyena_micro_p4_16": _cfg(16),
        "vitkit_hyena_tiny_p4_32": _cfg(32),
    }
)

_ARCHS = {
    "nano": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, mlp_ratio=2.0),
    "micro": dict(img_size=16, patch_size=4, embed_dim=64, depth=4, mlp_ratio=4.0),
    "tiny": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, mlp_ratio=2.0),
}

HYENA_OPTIONS = ("order", "filter_width", "filter", "direction")


def _build(variant: str, arch: str, pretrained: bool, **kwargs: Any) -> HyenaVisionTransformer:
    args: dict[str, Any] = {**_ARCHS[arch], "num_classes": 10, **kwargs}
    if args.pop("class_token", False) or args.get("reg_tokens"):
        raise VitkitError(
            f"{variant}: Hyena N-D mixes a square patch grid; it takes no class or register tokens"
        )
    hyena = {k: args.pop(k) for k in HYENA_OPTIONS if k in args}
    img = args["img_size"]
    patch = args["patch_size"]
    side = (img if isinstance(img, int) else img[0]) // (patch if isinstance(patch, int) else patch[0])
    args["attn_layer"] = hyena_layer(side, **hyena)
    return build_model_with_cfg(
        HyenaVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=args["depth"] - 1, feature_cls="getter"),
        class_token=False,
        num_heads=1,
        **args,
    )


@register_model
def vitkit_hyena_nano_p4_16(pretrained: bool = False, **kwargs: Any) -> HyenaVisionTransformer:
    """2-block, 32-wide Hyena N-D ViT for unit tests (16x16 input, patch 4)."""
    return _build("vitkit_hyena_nano_p4_16", "nano", pretrained, **kwargs)


@register_model
def vitkit_hyena_micro_p4_16(pretrained: bool = False, **kwargs: Any) -> HyenaVisionTransformer:
    """4-block, 64-wide Hyena N-D ViT, the match of vitkit_micro_p4_16."""
    return _build("vitkit_hyena_micro_p4_16", "micro", pretrained, **kwargs)


@register_model
def vitkit_hyena_tiny_p4_32(pretrained: bool = False, **kwargs: Any) -> HyenaVisionTransformer:
    """6-block, 192-wide Hyena N-D ViT for 32x32 inputs, the match of vitkit_tiny_p4_32."""
    return _build("vitkit_hyena_tiny_p4_32", "tiny", pretrained, **kwargs)

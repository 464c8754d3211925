"""S² multi-scale features: run a frozen model on several scales and concatenate the channels.

Paper: Shi, Darrell, Wang et al., "When Do We Not Need Larger Vision Models?" (ECCV 2024), code
bfshi/scaling_on_scales (``s2wrapper``). Followed faithfully: each scale's image (bicubic resize of
the input) is split into ``n × n`` sub-images of the model's input size ("chessboard", stacked in
the batch), the same model runs on every sub-image, the patch-token maps are merged back, area-
resized to the first scale's grid and concatenated along channels; prefix tokens are averaged over
the sub-images of a scale and concatenated over scales.

What it changes: nothing in the model; :class:`S2Wrapper` wraps it (frozen by default), and
:class:`S2Classifier` adds a pooled linear head for probing or fine-tuning.
Square inputs only; every scale's size must be a multiple of the split size (as in the reference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import model_input_size, num_prefix_tokens


def split_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, n·h, n·w) → (n·n·B, C, h, w), sub-images in row-major order, each stacked over the batch."""
    h, w = x.shape[-2:]
    if h % n or w % n:
        raise VitkitError(f"S²: a {h}x{w} image cannot be split into {n}x{n} equal sub-images")
    hs, ws = h // n, w // n
    return torch.cat(
        [x[..., i * hs : (i + 1) * hs, j * ws : (j + 1) * ws] for i in range(n) for j in range(n)], 0
    )


def merge_chessboard(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`split_chessboard`: (n·n·B, C, h, w) → (B, C, n·h, n·w)."""
    b = x.shape[0] // (n * n)
    rows = [torch.cat([x[(i * n + j) * b : (i * n + j + 1) * b] for j in range(n)], -1) for i in range(n)]
    return torch.cat(rows, -2)


class S2Wrapper(nn.Module):
    """Multi-scale features of ``model``. Input: normalized images (B, C, S, S) with S the base size
    (``scales[i]·S`` is scale i's size); output ``(B, N, C·len(scales))`` patch tokens on the first
    scale's grid (``output="bnc"``), ``(B, C·k, h, w)`` (``"bchw"``) or pooled ``(B, C·k)``.

    ``max_split_size`` defaults to the model's input size: every sub-image is exactly what the model
    expects, so no position-embedding resampling is needed.
    """

    def __init__(
        self,
        model: nn.Module,
        scales: Sequence[float] = (1, 2),
        max_split_size: int | None = None,
        output: str = "bnc",
        freeze: bool = True,
    ):
        super().__init__()
        if output not in ("bnc", "bchw", "pooled"):
            raise VitkitError(f"S² output must be bnc, bchw or pooled, got '{output}'")
        if not scales or any(s <= 0 for s in scales):
            raise VitkitError(f"S² scales must be positive numbers, got {list(scales)}")
        self.model = model
        self.scales = [float(s) for s in scales]
        _, h, w = model_input_size(model)
        if h != w:
            raise VitkitError(f"S² needs a square model input, got {h}x{w}")
        self.split = max_split_size or h
        self.output = output
        self.num_prefix = num_prefix_tokens(model)
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        if freeze:
            for p in model.parameters():
                p.requires_grad_(False)
        self.embed_dim = int(getattr(model, "num_features", getattr(model, "embed_dim", 0)))

    @property
    def out_dim(self) -> int:
        return self.embed_dim * len(self.scales)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.model.forward_features(x)
        prefix, patches = t[:, : self.num_prefix], t[:, self.num_prefix :]
        gh, gw = self.grid  # every sub-image has the model's input size
        return prefix, patches.transpose(1, 2).reshape(len(x), -1, gh, gw)

    def forward_multiscale(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if x.shape[-1] != x.shape[-2]:
            raise VitkitError(f"S² needs square images, got {x.shape[-2]}x{x.shape[-1]}")
        size0 = x.shape[-1]
        maps, prefixes = [], []
        for s in self.scales:
            size = round(size0 * s)
            n = max(1, math.ceil(size / self.split))
            if size % n:
                raise VitkitError(
                    f"S²: scale {s} gives {size} px, not divisible into {n} splits of {self.split}"
                )
            xs = (
                x
                if size == size0
                else F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
            )
            prefix, m = self._tokens(split_chessboard(xs, n))
            maps.append(merge_chessboard(m, n))
            if self.num_prefix:
                b = len(x)
                prefixes.append(prefix.reshape(n * n, b, *prefix.shape[1:]).mean(0))
        return maps, prefixes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps, _ = self.forward_multiscale(x)
        target = maps[0].shape[-2:]
        maps = [
            m if m.shape[-2:] == target else F.interpolate(m.float(), size=target, mode="area").to(m.dtype)
            for m in maps
        ]
        out = torch.cat(maps, 1)
        if self.output == "bchw":
            return out
        if self.output == "pooled":
            return out.mean((-2, -1))
        return out.flatten(2).transpose(1, 2)

    def prefix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Prefix tokens averaged over each scale's sub-images, concatenated over scales: (B, P, C·k)."""
        _, prefixes = self.forward_multiscale(x)
        if not prefixes:
            raise VitkitError("the model has no prefix tokens")
        return torch.cat(prefixes, -1)


class S2Classifier(nn.Module):
    """Mean-pooled S² features + a linear head (a probe when the wrapper is frozen)."""

    def __init__(self, wrapper: S2Wrapper, num_classes: int):
        super().__init__()
        wrapper.output = "pooled"
        self.s2 = wrapper
        self.norm = nn.LayerNorm(wrapper.out_dim)
        self.head = nn.Linear(wrapper.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.s2(x)))

"""LPViT — Xu et al., "LPViT: Low-Power Semi-structured Pruning for Vision Transformers", ECCV 2024.

Changes the model: every transformer-block linear (qkv, proj, fc1, fc2) gets a block-structured
mask (whole ``block × block`` tiles of the weight are zero or kept); the per-layer prune rates come
from a rate-distortion allocation with a hardware-aware (power) term, solved for a FLOPs budget.

Faithful to Akimoto-Cris/LPViT (``tools/pruners.py: gen_rd_curves_block_approx, RDPruner``,
``tools/algo.py``):

1. gradients without labels: ``g = E[∂ mean(f(x)²) / ∂W]`` over calibration batches;
2. tile score = mean of ``|W ⊙ g|`` (``taylor``) or ``|W|`` (``l1``) over the tile; at rate p keep the
   top ``int((1-p)·#tiles)`` tiles;
3. per-layer distortion curve on the grid p = d/grid: ``D(p) = mean((ΔW ⊙ g)²) + ½ ΔWᵀ(ggᵀ + λI)ΔW``
   (λ = 1e-7; the second-order term is computed in closed form, ``½((g·ΔW)² + λ‖ΔW‖²)``), smoothed
   by a de-biased EMA and made non-decreasing (their ``make_nondecreasing``);
4. power term ``P(p) = surviving tiles × floor(C_in/16)``, added as ``D + β·P`` with β the ratio of
   the mean maximal slopes of the D and P curves;
5. allocation: for a slope λ = ±2^s every layer takes the rate whose 5-point finite-difference
   derivative (step h) is closest to λ, capped at ``max_rate``; s is chosen so that the model's FLOPs
   (a sparse kernel's) meet the budget.

Fixed on purpose: the official power term counts surviving tiles as ``amount·numel/block²`` where
``amount`` is the *pruned* fraction; we use ``(1 - amount)``, and take β from the slope magnitudes so
that the power term rewards pruning power-hungry layers; slopes of both signs are searched, as
``D + β·P`` falls where the power saved outweighs the distortion. Our choices: s is searched on a
fine grid (not bisection) because the allocation is piecewise constant; patch embedding and classifier stay
dense; layer dims must be multiples of the tile size; the masked model runs dense matmuls (no
block-sparse kernel on this CPU), so LPViT gives FLOPs, not CPU latency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from vitkit.compress.prune.masked import (
    MaskedLinear,
    prunable_linears,
    sparsity_report,
    token_counts,
    use_masked_linears,
)
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import model_input_size, record_transform
from vitkit.registry import AS_IS, Technique, register
from vitkit.train.evaluate import eval_transform


@dataclass
class LPViTConfig:
    """``flops``: fraction of the dense model's FLOPs to keep (LPViT's main setting: 0.5).
    ``block``: tile size; ``importance``: taylor | l1; ``power``: add the power term."""

    flops: float = 0.5
    block: int = 16
    importance: str = "taylor"
    power: bool = True
    second_order: bool = True
    grid: int = 100
    smooth: float = 0.5
    h: int = 4
    max_rate: float = 0.95
    damp: float = 1e-7
    rates: dict[str, float] = field(default_factory=dict)  # resolved per-layer rates (recorded)

    def to_dict(self) -> dict:
        return asdict(self)


def label_free_gradients(
    model: nn.Module, data: ImageDataset, batches: int = 4, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """``E[∂ mean(f(x)²) / ∂W]`` for every prunable linear (LPViT needs no labels)."""
    layers = prunable_linears(model)
    tf = eval_transform(model)
    was = model.training
    model.eval()
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {name: torch.zeros_like(lin.weight) for name, lin in layers}
    n = max(1, min(batches, len(data) // batch_size))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, lin in layers:
            lin.weight.requires_grad_(True)
        for b in range(n):
            x = tf.images(data.images[b * batch_size : (b + 1) * batch_size])
            model.zero_grad(set_to_none=True)
            model(x.to(next(model.parameters()).device)).pow(2).mean().backward()
            for name, lin in layers:
                grads[name] += lin.weight.grad / n
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was)
    return grads


def tile_order(score: torch.Tensor, block: int) -> torch.Tensor:
    """Tile indices from least to most important (tile score = mean over the tile)."""
    o, i = score.shape
    tiles = score.reshape(o // block, block, i // block, block).mean(dim=(1, 3)).flatten()
    return tiles.argsort()


def tile_mask(shape: tuple[int, int], order: torch.Tensor, rate: float, block: int) -> torch.Tensor:
    """0/1 mask keeping the top ``int((1-rate)·#tiles)`` tiles."""
    o, i = shape
    nt = order.numel()
    pruned = nt - int((1.0 - rate) * nt)
    flat = torch.ones(nt, device=order.device)
    flat[order[:pruned]] = 0.0
    return flat.reshape(o // block, i // block).repeat_interleave(block, 0).repeat_interleave(block, 1)


def ema_smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """De-biased exponential moving average (TensorBoard's smoothing, as LPViT uses)."""
    out, last = np.empty_like(values), 0.0
    for n, v in enumerate(values, start=1):
        last = last * weight + (1 - weight) * v
        out[n - 1] = last / (1 - weight**n) if weight != 1 else last
    return out


def derivative(xs: np.ndarray, ys: np.ndarray, h: int) -> np.ndarray:
    """LPViT's ``derivative_approx``: the 5-point stencil with step h (shrinking near the ends)."""
    res = []
    for i in range(len(xs) - 1):
        hh = min(h, i, len(xs) - i - 1)
        if hh < 2 and i < 2:
            res.append((ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]))
        elif hh < 2:
            res.append((ys[i + 1] - ys[i - 1]) / (xs[i + 1] - xs[i - 1]))
        else:
            h2 = hh // 2
            res.append(
                (-ys[i + hh] + 8 * ys[i + h2] - 8 * ys[i - h2] + ys[i - hh]) / (6 * (xs[i + hh] - xs[i]))
            )
    return np.asarray(res)


def distortion_curve(
    w: torch.Tensor,
    g: torch.Tensor,
    order: torch.Tensor,
    rates: np.ndarray,
    block: int,
    second_order: bool,
    damp: float,
) -> np.ndarray:
    """``D(p)`` for every rate, from per-tile sums accumulated in pruning order (exact, cheap)."""
    o, i = w.shape
    t = lambda a: a.reshape(o // block, block, i // block, block).sum(dim=(1, 3)).flatten()[order]  # noqa: E731
    wg = (w * g).double()
    c1 = torch.cat([wg.new_zeros(1), t(wg**2).cumsum(0)])  # Σ (ΔW⊙g)² over pruned tiles
    c_lin = torch.cat([wg.new_zeros(1), t(wg).cumsum(0)])  # Σ g·W
    c_sq = torch.cat([wg.new_zeros(1), t(w.double() ** 2).cumsum(0)])  # Σ W²
    nt = order.numel()
    pruned = torch.as_tensor([nt - int((1.0 - p) * nt) for p in rates])
    d = c1[pruned] / w.numel()
    if second_order:
        d = d + 0.5 * (c_lin[pruned] ** 2 + damp * c_sq[pruned])
    return d.cpu().numpy()


def allocate(derivs: np.ndarray, rates: np.ndarray, max_rate: float, slope: float) -> list[float]:
    """For slope λ every layer takes the rate whose curve derivative is closest to λ (capped).

    ``derivs``: (layers, len(rates) - 1) from :func:`derivative`."""
    idx = np.argmin(np.abs(derivs - slope), axis=1)
    return [float(min(max_rate, rates[i])) for i in idx]


def apply_lpvit(
    model: nn.Module,
    cfg: LPViTConfig | dict | None = None,
    data: ImageDataset | None = None,
    *,
    calib_batches: int = 4,
    batch_size: int = 64,
) -> nn.Module:
    """Block-structured masks on every block linear for a FLOPs budget (in place); records ``lpvit``."""
    cfg = LPViTConfig(**cfg) if isinstance(cfg, dict) else (cfg or LPViTConfig())
    if not 0.0 < cfg.flops < 1.0:
        raise VitkitError(f"LPViT flops: the fraction of FLOPs kept must be in (0, 1), got {cfg.flops}")
    if cfg.importance not in ("taylor", "l1"):
        raise VitkitError(f"LPViT importance: expected taylor or l1, got '{cfg.importance}'")
    if not 0.0 < cfg.max_rate <= 1.0:
        raise VitkitError(f"LPViT max_rate must be in (0, 1], got {cfg.max_rate}")
    b = int(cfg.block)
    layers = prunable_linears(model)
    for name, lin in layers:
        if b < 1 or lin.weight.shape[0] % b or lin.weight.shape[1] % b:
            raise VitkitError(
                f"LPViT block={b}: {name} is {tuple(lin.weight.shape)}, not a multiple of the tile size"
            )
    if data is None:
        raise VitkitError("LPViT needs calibration images (its gradients need no labels)")
    shape = model_input_size(model)
    grads = label_free_gradients(model, data, calib_batches, batch_size)
    tokens = token_counts(model, shape)
    report = sparsity_report(model, shape)
    dense = report["dense_flops"]

    rates = np.linspace(0.0, 1.0, cfg.grid + 1)
    orders, curves, powers, flops_per = {}, [], [], []
    with torch.no_grad():
        for name, lin in layers:
            w, g = lin.weight.detach(), grads[name]
            score = (w * g).abs() if cfg.importance == "taylor" else w.abs()
            orders[name] = order = tile_order(score, b)
            d = ema_smooth(distortion_curve(w, g, order, rates, b, cfg.second_order, cfg.damp), cfg.smooth)
            d = np.maximum.accumulate(
                d
            )  # distortion cannot fall as more is pruned (their make_nondecreasing)
            curves.append(d)
            nt = order.numel()
            kept = np.asarray([int((1.0 - p) * nt) for p in rates], dtype=float)
            powers.append(kept * max(1, lin.in_features // 16))
            flops_per.append(2 * tokens[name] * lin.weight.numel())
    if cfg.power:
        d_slope = np.mean([derivative(rates, c, cfg.h).max() for c in curves])
        p_slope = np.mean([np.abs(derivative(rates, p, cfg.h)).max() for p in powers])
        beta = d_slope / p_slope if p_slope > 0 else 0.0
        curves = [c + beta * p for c, p in zip(curves, powers)]

    prunable = sum(flops_per)
    target = cfg.flops * dense
    floor = dense - prunable * cfg.max_rate
    if target < floor - 1e-6 * dense:
        raise VitkitError(
            f"LPViT flops={cfg.flops}: at most {cfg.max_rate:.0%} of each block linear can go, so the model "
            f"cannot go below {floor / dense:.3f} of its FLOPs"
        )

    # every slope at once: the grid index each layer picks, and the FLOPs a sparse kernel would need
    derivs = np.stack([derivative(rates, c, cfg.h) for c in curves])  # (layers, grid)
    capped = np.minimum(rates[:-1], cfg.max_rate)
    saved = np.stack(
        [
            f * np.asarray([nt - int((1.0 - p) * nt) for p in capped]) / nt
            for f, nt in zip(flops_per, (orders[name].numel() for name, _ in layers))
        ]
    )  # (layers, grid): FLOPs saved by each layer at each capped rate
    pos = 2.0 ** np.linspace(-80, 40, 2401)
    slopes = np.concatenate([-pos[::-1], [0.0], pos])  # the power term can make slopes negative
    best_err, best = float("inf"), None
    for chunk in np.array_split(slopes, 16):
        idx = np.abs(derivs[None] - chunk[:, None, None]).argmin(axis=2)  # (slopes, layers)
        flops = dense - np.take_along_axis(saved[None], idx[..., None], axis=2)[..., 0].sum(axis=1)
        j = int(np.abs(flops - target).argmin())
        if abs(flops[j] - target) < best_err:
            best_err, best = abs(flops[j] - target), [float(capped[i]) for i in idx[j]]
    assert best is not None
    masked = dict(use_masked_linears(model))
    with torch.no_grad():
        for (name, _lin), p in zip(layers, best):
            m = masked[name]
            m.weight_mask.copy_(tile_mask(tuple(m.weight.shape), orders[name].to(m.weight.device), p, b))
    cfg.rates = {name: round(p, 4) for (name, _), p in zip(layers, best)}
    record_transform(model, "lpvit", cfg.to_dict())
    return model


def replay_lpvit(model: nn.Module, config: dict) -> nn.Module:
    use_masked_linears(model)
    record_transform(model, "lpvit", dict(config))
    return model


def is_tile_constant(mask: torch.Tensor, block: int) -> bool:
    """True when every ``block × block`` tile of ``mask`` is all zeros or all ones."""
    o, i = mask.shape
    t = mask.reshape(o // block, block, i // block, block)
    return bool((t.amin(dim=(1, 3)) == t.amax(dim=(1, 3))).all())


__all__ = ["LPViTConfig", "MaskedLinear", "apply_lpvit", "is_tile_constant", "replay_lpvit"]


register(
    Technique(
        name="lpvit",
        summary="block-structured weight masks with rate-distortion, power-aware per-layer rates",
        paper='Xu et al., "LPViT: Low-Power Semi-structured Pruning for Vision Transformers" (2024)',
        config=LPViTConfig,
        replay=replay_lpvit,
        export=AS_IS,
        family="compress",
        verb="vitkit prune RUN --method lpvit",
    )
)

"""Calibration: set every quantizer of a quantized model from a few images; block reconstruction.

Regime: *parallel* (PTQ4ViT, AdaLog) — every point is calibrated on inputs produced by the float
model (quantizers disabled), which PTQ4ViT found better than sequential with small calibration
sets. Work goes block by block so only one block's activations are held at a time.

Per block: capture the inputs of its points → (method-dependent) SmoothQuant-with-bias or RepQ
post-LN reparameterization of norm1→qkv and norm2→fc1 → weight quantizers → activation
quantizers (min-max, percentile or MSE search; PTQ4ViT/AdaLog search against the next layer's
output error) → post-softmax / post-GELU quantizers.

Block reconstruction (:func:`reconstruct_blocks`, BRECQ/AdaRound style, Nagel et al. "Up or Down?
Adaptive Rounding for Post-Training Quantization", ICML 2020; Li et al. "BRECQ", ICLR 2021): per
block, learn each weight's rounding (up or down) so that the quantized block, fed the *quantized*
model's block input, reproduces the float block output (MSE + the AdaRound regulariser with β
annealed 20 → 2 after a 20 % warm-up). Simplified: activation scales stay fixed (AdaLog also learns
them), the patch embedding and head are not reconstructed, and the default budget is 200 iterations
per block (AdaLog: 20000), sized for 2 CPU cores. The hard rounding is baked into the weights.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vitkit.compress.quant.config import QuantConfig
from vitkit.compress.quant.layers import QuantConv2d, QuantLinear, QuantMatMul, QuantSoftmax
from vitkit.compress.quant.points import QuantPoint, built_points, set_quantizers_enabled
from vitkit.compress.quant.quantizers import (
    AdaLogQuantizer,
    Quantizer,
    UniformQuantizer,
)
from vitkit.compress.quant.reparam import reparam_post_ln, smooth_post_ln
from vitkit.progress import track

MAX_ROWS = 1024  # token rows used by output-error searches
MAX_MAP_ELEMENTS = 1 << 20  # attention-map elements used by post-softmax searches


@dataclass
class CalibrationReport:
    seconds: float = 0.0
    reconstruction_seconds: float = 0.0
    images: int = 0
    quantizers: int = 0
    reparameterized: list[str] = field(default_factory=list)
    smoothed: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    reconstruction_mse: dict[str, tuple[float, float]] = field(default_factory=dict)  # block: (before, after)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def single_thread():
    """Run the parameter searches on one thread: they are many small element-wise ops on subsampled
    tensors, where intra-op threading costs more than it saves (measured 10-60x slower with 2
    threads on this shared, loaded 2-core machine; on an idle one the difference is small)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(images: torch.Tensor, bs: int):
    for i in range(0, len(images), bs):
        yield images[i : i + bs]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _row_sample(
    x: torch.Tensor, n: int = MAX_ROWS, seed: int = 0, extremes: int = MAX_ROWS // 8
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to ``n`` token rows of ``x`` for the output-error searches, with per-row weights (None:
    every row). Always included: the ``extremes`` rows holding the largest and the smallest values
    (DINOv2's few high-norm tokens, which a random sample misses and a search on it then clips);
    the rest is a fixed random sample of the other rows, weighted so that a weighted mean over the
    sample estimates the mean over all rows."""
    rows = x.reshape(-1, x.shape[-1])
    total = len(rows)
    if total <= n:
        return rows, None
    e = min(extremes, n // 2)
    fixed = torch.cat(
        [rows.amax(1).topk(e - e // 2).indices, rows.amin(1).topk(e // 2, largest=False).indices]
    )
    fixed = fixed.unique()
    others = torch.ones(total, dtype=torch.bool, device=rows.device)
    others[fixed] = False
    others = others.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    picked = others[torch.randperm(len(others), generator=g)[: n - len(fixed)]]
    weights = torch.cat(
        [
            torch.ones(len(fixed), device=rows.device),
            torch.full((len(picked),), len(others) / max(len(picked), 1), device=rows.device),
        ]
    )
    return rows[torch.cat([fixed, picked])], weights


def _weighted_mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_row.mean() if weights is None else (per_row * weights).sum() / weights.sum()


def _map_sample(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The first images of attention-shaped tensors so the map stays under MAX_MAP_ELEMENTS."""
    per_image = xs[0][0].numel()
    k = max(1, min(len(xs[0]), MAX_MAP_ELEMENTS // max(per_image, 1)))
    return tuple(x[:k] for x in xs)


@torch.no_grad()
def _capture_blocks(model: nn.Module, points: list[QuantPoint], images: torch.Tensor, bs: int, outputs: bool):
    """One float pass: inputs (and outputs) of every block, inputs of the points outside blocks."""
    blocks = _blocks(points)
    block_in: dict[int, list] = defaultdict(list)
    block_out: dict[int, list] = defaultdict(list)
    global_in: dict[str, list] = defaultdict(list)
    handles = []
    for i, b in blocks.items():
        handles.append(b.register_forward_pre_hook(lambda m, a, i=i: block_in[i].append(a[0].detach())))
        if outputs:
            handles.append(b.register_forward_hook(lambda m, a, o, i=i: block_out[i].append(o.detach())))
    for p in points:
        if p.block is None:
            handles.append(
                p.module.register_forward_pre_hook(lambda m, a, n=p.name: global_in[n].append(a[0].detach()))
            )
    dev = _device(model)
    try:
        for x in _batches(images, bs):
            model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
    cat = lambda d: {k: _cat(v) for k, v in d.items()}  # noqa: E731
    return cat(block_in), cat(block_out), cat(global_in)


def _cat(captured: list[torch.Tensor]) -> torch.Tensor:
    """The inputs one module saw, as one tensor. A module applied at several sizes (a detector head
    shared over the pyramid's levels) gives rows of channels instead: its input quantizer is per
    tensor (a conv) or per last axis (a linear), which either layout serves."""
    if len({t.shape[1:] for t in captured}) == 1:
        return torch.cat(captured)
    return torch.cat(
        [
            t.movedim(1, -1).reshape(-1, t.shape[1]) if t.ndim == 4 else t.reshape(-1, t.shape[-1])
            for t in captured
        ]
    )


def _blocks(points: list[QuantPoint]) -> dict[int, nn.Module]:
    return {p.block: p.block_module for p in points if p.block is not None}


@torch.no_grad()
def _capture_points(block: nn.Module, pts: list[QuantPoint], x: torch.Tensor, bs: int) -> dict[str, dict]:
    """Inputs of the block's points (softmax: its output) on the float block input ``x``."""
    got: dict[str, dict[str, list]] = {p.name: defaultdict(list) for p in pts}
    handles = []
    for p in pts:
        m, store = p.module, got[p.name]
        if isinstance(m, QuantSoftmax):
            handles.append(m.register_forward_hook(lambda mod, a, o, s=store: s["out"].append(o.detach())))
        elif isinstance(m, QuantMatMul):

            def both(mod, a, s=store):  # a pre-hook must return None (a value would replace the input)
                s["a"].append(a[0].detach())
                s["b"].append(a[1].detach())

            handles.append(m.register_forward_pre_hook(both))
        elif hasattr(m, "register_forward_pre_hook"):
            handles.append(m.register_forward_pre_hook(lambda mod, a, s=store: s["in"].append(a[0].detach())))
    try:
        for xb in _batches(x, bs):
            block(xb)
    finally:
        for h in handles:
            h.remove()
    return {n: {k: torch.cat(v) for k, v in d.items()} for n, d in got.items()}


def _linear_loss(
    x_rows: torch.Tensor, weight: torch.Tensor, row_weights: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The next linear layer's output error (mean over the rows, weighted as sampled)."""
    w = weight.detach().float()
    return lambda xhat: _weighted_mean(((xhat - x_rows) @ w.T).pow(2).mean(1), row_weights)


def _sample_mse(
    x_rows: torch.Tensor, row_weights: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda xhat: _weighted_mean((xhat - x_rows).pow(2).mean(1), row_weights)


def _calibrate_input(q: Quantizer, x: torch.Tensor, cfg: QuantConfig, weight: torch.Tensor | None) -> None:
    """A linear layer's input quantizer. Uniform quantizers without an output-error search see
    every value; searches against the next layer's output run on a row sample (with the extreme
    rows) and take the range from every value."""
    spec = cfg.spec
    output_loss = spec.output_loss and weight is not None and x.ndim >= 2
    if isinstance(q, UniformQuantizer) and (q.channels > 1 or not output_loss):
        q.calibrate(x, method=spec.act_calib, percentile=cfg.percentile)
        return
    if x.ndim < 2:
        q.calibrate(x)
        return
    rows, row_weights = _row_sample(x)
    loss = _linear_loss(rows, weight, row_weights) if output_loss else _sample_mse(rows, row_weights)
    if isinstance(q, UniformQuantizer):
        q.calibrate(rows, loss=loss, method=spec.act_calib, percentile=cfg.percentile, reference=x)
    elif isinstance(q, AdaLogQuantizer):
        q.calibrate(rows, loss=loss, reference=x)
    else:
        q.calibrate(rows, loss=loss)


def _calibrate_weight(layer: QuantLinear | QuantConv2d, cfg: QuantConfig) -> None:
    q = layer.weight_quantizer
    if isinstance(q, UniformQuantizer):
        q.calibrate(layer.weight, method=cfg.spec.weight_calib, percentile=cfg.percentile)


def _post_ln(
    model: nn.Module,
    p: QuantPoint,
    layer: QuantLinear,
    x: torch.Tensor,
    cfg: QuantConfig,
    report: CalibrationReport,
) -> tuple[torch.Tensor, bool]:
    """SmoothQuant-with-bias or RepQ reparameterization of p.norm → layer. Returns the layer's new
    input x' and whether its input quantizer was already set (RepQ: the reparameterized (s̃, z̃))."""
    norm = model.get_submodule(p.norm)
    spec = cfg.spec
    if cfg.smoothquant:
        s, z = smooth_post_ln(norm, layer, x, cfg.smooth_alpha)
        report.smoothed.append(p.name)
        return (x - z) / s, False
    assert spec.reparam is not None
    q = layer.input_quantizer
    per_channel = UniformQuantizer(q.bits, symmetric=False, channels=x.shape[-1], axis=-1).to(x.device)
    per_channel.calibrate(
        x, method="percentile" if spec.act_calib != "minmax" else "minmax", percentile=cfg.percentile
    )
    s_t, z_t, r, b = reparam_post_ln(
        norm, layer, per_channel.scale, per_channel.zero_point, target=spec.reparam
    )
    report.reparameterized.append(p.name)
    x_new = x / r - b
    if isinstance(q, UniformQuantizer) and q.channels == 1 and not spec.output_loss and not q.symmetric:
        q.set_params(s_t, z_t)  # RepQ: the reparameterized per-tensor parameters, no re-search
        return x_new, True
    return x_new, False  # AdaLog: re-search the per-tensor parameters on x'


@torch.no_grad()
def calibrate_model(model: nn.Module, images: torch.Tensor, cfg: QuantConfig) -> CalibrationReport:
    """Calibrate every quantizer of an already-quantized structure (see :func:`build_structure`)."""
    report = CalibrationReport(images=len(images))
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    points = built_points(model)
    set_quantizers_enabled(model, False)
    block_in, _, global_in = _capture_blocks(model, points, images, cfg.calib_batch, outputs=False)
    by_block: dict[int, list[QuantPoint]] = defaultdict(list)
    for p in points:
        if p.block is not None:
            by_block[p.block].append(p)

    for i in track(sorted(by_block), total=len(by_block), description="calibrating", min_items=1):
        pts = by_block[i]
        captured = _capture_points(pts[0].block_module, pts, block_in[i], cfg.calib_batch)
        values = {p.role: p for p in pts}
        with single_thread():
            for p in pts:
                _calibrate_point(model, p, captured, values, cfg, report)
        del captured
    with single_thread():
        for p in points:
            if p.block is None and p.name in global_in:
                _calibrate_linear_like(model, p, global_in[p.name], cfg, report)
    set_quantizers_enabled(model, True)
    report.quantizers = sum(isinstance(m, Quantizer) for m in model.modules())
    report.seconds = time.perf_counter() - t0
    model.train(was_training)
    return report


def _calibrate_point(model, p: QuantPoint, captured: dict, values: dict, cfg: QuantConfig, report) -> None:
    m, got = p.module, captured[p.name]
    if isinstance(m, (QuantLinear, QuantConv2d)):
        _calibrate_linear_like(model, p, got["in"], cfg, report)
    elif isinstance(m, QuantMatMul):
        a, b = got["a"], got["b"]
        if isinstance(m.a_quantizer, Quantizer):
            sa, sb = _map_sample(a, b)
            loss = (lambda ah: ((ah - sa) @ sb).pow(2).mean()) if cfg.spec.output_loss else None
            _calibrate_operand(m.a_quantizer, sa if loss else a, cfg, loss, reference=a)
        if isinstance(m.b_quantizer, Quantizer):
            _calibrate_operand(m.b_quantizer, b, cfg, None)
    elif isinstance(m, QuantSoftmax):
        probs = got["out"]
        q = m.output_quantizer
        av = values.get("av")
        v = captured[av.name]["b"] if av is not None and av.name in captured else None
        if v is not None and cfg.spec.output_loss:
            sp, sv = _map_sample(probs, v)
            loss = lambda ph: ((ph - sp) @ sv).pow(2).mean()  # noqa: E731
        else:
            (sp,), loss = _map_sample(probs), None
        if isinstance(q, AdaLogQuantizer):
            q.calibrate(sp, loss=loss, fixed_scale=1.0)  # AdaLog: s = 1 for probabilities
        elif isinstance(q, UniformQuantizer):
            q.calibrate(
                sp if loss else probs, loss=loss, method=cfg.spec.act_calib, percentile=cfg.percentile
            )
        elif isinstance(q, Quantizer):
            q.calibrate(sp, loss=loss)
    else:
        from vitkit.compress.quant.intonly import IntSoftmax

        if isinstance(m, IntSoftmax):
            m.calibrate(got["in"])


def _calibrate_operand(
    q: Quantizer, x: torch.Tensor, cfg: QuantConfig, loss, reference: torch.Tensor | None = None
) -> None:
    if isinstance(q, UniformQuantizer):
        q.calibrate(x, loss=loss, method=cfg.spec.act_calib, percentile=cfg.percentile, reference=reference)
    else:
        q.calibrate(x, loss=loss)


def _calibrate_linear_like(model, p: QuantPoint, x: torch.Tensor, cfg: QuantConfig, report) -> None:
    layer = p.module
    preset = False
    if p.norm is not None and isinstance(layer, QuantLinear) and (cfg.smoothquant or cfg.spec.reparam):
        x, preset = _post_ln(model, p, layer, x, cfg, report)
    _calibrate_weight(layer, cfg)
    q = layer.input_quantizer
    if not isinstance(q, Quantizer) or preset:
        return
    if isinstance(layer, QuantConv2d):
        q.calibrate(x, method=cfg.spec.act_calib, percentile=cfg.percentile)
        return
    weight = (
        layer.quantized_weight()
        if bool(getattr(layer.weight_quantizer, "calibrated", True))
        else layer.weight
    )
    _calibrate_input(q, x, cfg, weight)


# -- AdaLog post-GELU bias reparameterization --------------------------------------------------
@torch.no_grad()
def fold_gelu_shifts(model: nn.Module) -> list[str]:
    """Fold the η shift of every AdaLog post-GELU quantizer into its layer's bias, using the final
    quantized weights: bias ← bias − W_q·(η·1); the quantizer then stops subtracting η."""
    done = []
    for name, layer in model.named_modules():
        q = getattr(layer, "input_quantizer", None)
        if isinstance(layer, QuantLinear) and isinstance(q, AdaLogQuantizer) and float(q.shift) != 0:
            if bool(q.shift_folded):
                continue
            wq = layer.quantized_weight()
            layer.bias.sub_(wq.sum(1) * float(q.shift))
            q.shift_folded.fill_(True)
            done.append(name)
    return done


# -- block reconstruction ----------------------------------------------------------------------
class _AdaRound:
    """Learnable rounding of a uniform-quantized weight: W̃ = s·(clamp(⌊W/s⌋ + h(V) + z) − z)."""

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, layer: QuantLinear | QuantConv2d):
        q = layer.weight_quantizer
        self.layer, self.q = layer, q
        w = layer.weight.detach()
        self.s = q._view(q.scale, w)
        self.z = q._view(q.zero_point, w)
        self.floor = torch.floor(w / self.s)
        rest = (w / self.s - self.floor).clamp(0.01, 0.99)
        self.v = nn.Parameter(-torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def soft_weight(self, hard: bool = False) -> torch.Tensor:
        up = (self.v >= 0).float() if hard else self.h()
        return (torch.clamp(self.floor + up + self.z, self.q.qmin, self.q.qmax) - self.z) * self.s

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def bake(self) -> None:
        with torch.no_grad():
            self.layer.weight.copy_(self.soft_weight(hard=True))
        self.layer._weight_override = None


def _quant_block_inputs(model: nn.Module, block: nn.Module, images: torch.Tensor, bs: int) -> torch.Tensor:
    got = []

    def hook(m, a):
        got.append(a[0].detach())
        raise _Stop

    h = block.register_forward_pre_hook(hook)
    dev = _device(model)
    try:
        with torch.no_grad():
            for x in _batches(images, bs):
                with contextlib.suppress(_Stop):
                    model(x.to(dev))
    finally:
        h.remove()
    return torch.cat(got)


def reconstruct_blocks(
    model: nn.Module, images: torch.Tensor, cfg: QuantConfig, report: CalibrationReport
) -> None:
    """AdaRound block reconstruction of every transformer block (see module docstring)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    points = built_points(model)
    blocks = _blocks(points)
    set_quantizers_enabled(model, False)
    fp_in, fp_out, _ = _capture_blocks(model, points, images, cfg.calib_batch, outputs=True)
    del fp_in
    set_quantizers_enabled(model, True)
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed)
    try:
        for i in track(sorted(blocks), total=len(blocks), description="reconstructing", min_items=1):
            block = blocks[i]
            xq = _quant_block_inputs(model, block, images, cfg.calib_batch)
            target = fp_out[i]
            layers = [
                m
                for m in block.modules()
                if isinstance(m, (QuantLinear, QuantConv2d))
                and isinstance(m.weight_quantizer, UniformQuantizer)
            ]
            if not layers:
                continue
            before = _block_mse(block, xq, target, cfg.calib_batch)
            rounders = [_AdaRound(m) for m in layers]
            for r in rounders:
                r.layer._weight_override = r.soft_weight
            opt = torch.optim.Adam([r.v for r in rounders], lr=cfg.recon_lr)
            iters, warm = cfg.recon_iters, int(0.2 * cfg.recon_iters)
            for t in range(iters):
                idx = torch.randint(len(xq), (min(cfg.recon_batch, len(xq)),), generator=g)
                with torch.enable_grad():
                    rec = (block(xq[idx]) - target[idx]).pow(2).mean()
                    loss = rec
                    if t >= warm:
                        rel = (t - warm) / max(iters - warm, 1)
                        beta = 2 + (20 - 2) * (1 - rel)
                        loss = rec + cfg.recon_round_weight * sum(r.regulariser(beta) for r in rounders)
                    opt.zero_grad()
                    loss.backward()
                opt.step()
            for r in rounders:
                r.bake()
            after = _block_mse(block, xq, target, cfg.calib_batch)
            report.reconstruction_mse[f"block{i}"] = (before, after)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m in model.modules():
            if isinstance(m, (QuantLinear, QuantConv2d)):
                m._weight_override = None
        model.train(was_training)
    report.reconstruction_seconds = time.perf_counter() - t0


@torch.no_grad()
def _block_mse(block: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    total, n = 0.0, 0
    for i in range(0, len(x), bs):
        out = block(x[i : i + bs])
        total += float((out - y[i : i + bs]).pow(2).sum())
        n += out.numel()
    return total / max(n, 1)

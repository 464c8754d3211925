"""Quantizers for post-training quantization of ViTs: quantize-dequantize ("fake quant") modules.

Papers (one class each):
* uniform asymmetric / symmetric, per tensor / per channel / per head — the reference quantizer
  (e.g. Nagel et al., "A White Paper on Neural Network Quantization", 2021);
* ``Log2Quantizer`` and ``LogSqrt2Quantizer`` — post-softmax log quantizers of RepQ-ViT (Li et al.,
  "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision Transformers", ICCV 2023);
* ``TwinUniformQuantizer`` — PTQ4ViT (Yuan et al., "PTQ4ViT: Post-training Quantization for Vision
  Transformers with Twin Uniform Quantization", ECCV 2022), post-softmax and post-GELU;
* ``AdaLogQuantizer`` — AdaLog (Wu et al., "AdaLog: Post-Training Quantization for Vision Transformers
  with Adaptive Logarithm Quantizer", ECCV 2024): base 2^(q/r), table read-out, post-GELU shift η
  that can be folded into the next layer's bias;
* ``ShiftLog2Quantizer`` — SULQ of I&S-ViT (Zhong et al., "I&S-ViT: An Inclusive & Stable Method for
  Pushing the Limit of Post-Training ViTs Quantization", 2023);
* ``TanQuantizer`` — TanQ of DopQ-ViT (Yang et al., "DopQ-ViT: Towards Distribution-Friendly and
  Outlier-Aware Post-Training Quantization for Vision Transformers", 2024).

What changes in the model: nothing by itself; layers (``layers.py``) call a quantizer on a weight or
an activation. Every quantizer keeps its parameters in **buffers** (saved in ``model.safetensors``
and reloaded by ``vitkit.load``); ``calibrate(x)`` sets them from data once; there is no lazy
initialisation on a first forward. An uncalibrated quantizer refuses to run. Under autograd the
forward uses a straight-through estimator (STE) for rounding, so block reconstruction can train
through it.

Deliberate differences from the public code (see research notes §1–§5):
* Log quantizers use exactly 2^b codes: 2^b − 1 non-zero levels plus one code for 0 (RepQ/AdaLog
  code clamps to 2^b − 1 *and* maps overflow to 0, i.e. 2^b + 1 levels).
* Twin uniform selects ONE region per value (PTQ4ViT's code adds both regions' outputs).
* AdaLog uses the table read-out in search, forward and STE alike (its code trains with the exact
  power and evaluates with the table).
* SULQ uses the same grid Δ = (M − m)/(2^b − 1) in search and forward (its code searches with one
  and runs with another).
* TanQ: no public code and the formula is not in any source available here; this is our reading of
  the abstract ("tangent mapping, levels dense near 0 and near 1"): codes are uniform in
  t = tan(θ(2x − 1))/tan θ, so levels are x = ½ + atan(t·tan θ)/(2θ), dense at both ends; θ is
  searched by MSE (θ → 0 is uniform).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from vitkit.errors import VitkitError

MIN_BITS, MAX_BITS = 2, 16
GELU_MIN = 0.16997124  # -min GELU(x): the shift that makes post-GELU values non-negative
MAX_SEARCH_ELEMENTS = 1 << 18  # calibration searches run on a fixed random subsample of this size
TAIL_FRACTION = 1e-3  # values kept exactly at each end of a large tensor (percentile candidates reach 0.1 %)

Loss = Callable[[torch.Tensor], torch.Tensor]  # xhat -> scalar (lower is better)


def check_bits(bits: object, field: str = "bits") -> int:
    """Bits must be an integer in 2..16; anything else is a user error naming the field."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise VitkitError(f"{field} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (identity)."""
    return x + (x.round() - x).detach()


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _pass_through(x: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
    """Value ``xhat``, gradient of the identity (STE for non-uniform quantizers)."""
    return x + (xhat - x).detach() if _needs_grad(x) else xhat


def _pow2_neg(e: torch.Tensor) -> torch.Tensor:
    """2^(-e) for integer-valued ``e``, exact in float32."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), -e.to(torch.int32))


def subsample(x: torch.Tensor, n: int = MAX_SEARCH_ELEMENTS, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of ``n`` elements (flattened) for calibration searches."""
    flat = x.detach().reshape(-1).float()
    if flat.numel() <= n:
        return flat
    g = torch.Generator().manual_seed(seed)
    return flat[torch.randint(flat.numel(), (n,), generator=g)]


def _rows(x: torch.Tensor, axis: int, channels: int) -> torch.Tensor:
    """``x`` as (channels, M) float: the quantization axis first."""
    x = x.detach().float()
    return x.reshape(1, -1) if channels == 1 else x.movedim(axis, 0).reshape(channels, -1)


def _quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile by sorting (torch.quantile refuses more than 16M elements)."""
    k = min(max(round(q * (rows.shape[1] - 1)), 0), rows.shape[1] - 1)
    return rows.sort(dim=1).values[:, k]


class CalibrationValues:
    """The values of a tensor as (channels, M) rows for calibration searches.

    Up to ``4 · max_elements`` values: every value. Beyond: the ``k`` smallest and ``k`` largest
    values of each row exactly (k = ``tail`` of the row, at least 0.1 %), plus a fixed random sample
    of the values between them, weighted so that a weighted mean over :attr:`rows` estimates the
    mean over the full row. A plain subsample misses the few extreme values (DINOv2's high-norm
    tokens, a fraction of a percent of all values); the range, the percentiles and the clipping
    error then come out wrong while the rounding error of the bulk needs only a sample.
    """

    def __init__(
        self,
        x: torch.Tensor,
        axis: int = -1,
        channels: int = 1,
        tail: float = TAIL_FRACTION,
        max_elements: int = MAX_SEARCH_ELEMENTS,
        seed: int = 0,
    ):
        full = _rows(x, axis, channels)
        self.n = n = full.shape[1]
        self.lo, self.hi = full.min(1).values, full.max(1).values
        k = min(n, math.ceil(max(tail, TAIL_FRACTION) * n) + 2)
        if full.numel() <= 4 * max_elements or 2 * k >= n:
            self.rows, self.weights = full, None
            self._sorted: torch.Tensor | None = None
            return
        self.k = k
        self._low = full.topk(k, dim=1, largest=False).values  # ascending
        self._high = full.topk(k, dim=1).values  # descending
        g = torch.Generator().manual_seed(seed)
        middle = full[:, torch.randint(n, (max(max_elements // channels, 256),), generator=g)]
        inside = (middle > self._low[:, -1:]) & (middle < self._high[:, -1:])
        per_value = (n - 2 * k) / inside.sum(1, keepdim=True).clamp_min(1)
        tails = torch.ones_like(self._low)
        self.rows = torch.cat([self._low, middle, self._high], 1)
        self.weights = torch.cat([tails, inside.float() * per_value, tails], 1)

    def quantile(self, q: float) -> torch.Tensor:
        """Per-row quantile (the value at rank round(q·(n − 1)) of the sorted row), exact."""
        r = min(max(round(q * (self.n - 1)), 0), self.n - 1)
        if self.weights is None:
            if self._sorted is None:
                self._sorted = self.rows.sort(dim=1).values
            return self._sorted[:, r]
        if r < self.k:
            return self._low[:, r]
        if self.n - 1 - r < self.k:
            return self._high[:, self.n - 1 - r]
        raise ValueError(f"quantile {q} lies outside the exact tails ({self.k} of {self.n} values)")

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row (weighted) mean of ``values`` computed element-wise from :attr:`rows`."""
        if self.weights is None:
            return values.mean(1)
        return (values * self.weights).sum(1) / self.weights.sum(1)


class Quantizer(nn.Module):
    """Base class. Subclasses implement ``_fake`` (quantize-dequantize) and ``calibrate``.

    ``enabled = False`` passes values through (used while capturing calibration statistics).
    ``int8_onnx`` says whether onnxruntime can run this quantizer as an INT8 QDQ pair.
    """

    kind: ClassVar[str] = "quantizer"
    int8_onnx: ClassVar[bool] = False

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.calibrated):
            raise VitkitError(
                f"{type(self).__name__} ({self.bits} bits) is not calibrated: call vitkit.quantize(model, "
                "calib_data, config) or load a saved quantized run"
            )
        return self._fake(x)

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def calibrate(self, x: torch.Tensor, loss: Loss | None = None) -> Quantizer:
        raise NotImplementedError

    def _done(self) -> Quantizer:
        self.calibrated.fill_(True)
        return self

    def mse(self, x: torch.Tensor) -> float:
        """Mean squared quantization error on ``x`` (calibrated or not)."""
        with torch.no_grad():
            return float((self._fake(x.float()) - x.float()).pow(2).mean())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _search(
    candidates: list[dict[str, torch.Tensor | float]],
    apply: Callable[[dict], torch.Tensor],
    loss: Loss,
) -> dict:
    """Pick the candidate parameter set with the lowest loss of its quantized output."""
    best, best_loss = candidates[0], math.inf
    for cand in candidates:
        value = float(loss(apply(cand)))
        if value < best_loss:
            best, best_loss = cand, value
    return best


class UniformQuantizer(Quantizer):
    """Uniform quantizer. Asymmetric: q = clamp(round(x/s) + z, 0, 2^b − 1), x̂ = (q − z)·s.
    Symmetric: q = clamp(round(x/s), −2^(b−1), 2^(b−1) − 1), x̂ = q·s.

    ``channels`` > 1 gives one (s, z) per index along ``axis`` (per output channel for weights, per
    input channel for activations, per head for q/k/v).
    """

    kind = "uniform"
    int8_onnx = True

    def __init__(self, bits: int, symmetric: bool = False, channels: int = 1, axis: int = -1):
        super().__init__(bits)
        self.symmetric = bool(symmetric)
        self.channels = int(channels)
        self.axis = int(axis)
        self.register_buffer("scale", torch.ones(self.channels))
        self.register_buffer("zero_point", torch.zeros(self.channels))

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            return t
        shape = [1] * x.ndim
        shape[self.axis] = self.channels
        return t.view(shape)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) of ``x``."""
        s, z = self._view(self.scale, x), self._view(self.zero_point, x)
        return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax)

    export_qdq = False  # set by deploy.qdq_export: emit torch fake-quantize ops (ONNX QDQ pairs)

    def _fake_quantize_op(self, x: torch.Tensor) -> torch.Tensor:
        zp = self.zero_point.round().to(torch.int32)
        if self.channels == 1:
            return torch.fake_quantize_per_tensor_affine(
                x, float(self.scale[0]), int(zp[0]), self.qmin, self.qmax
            )
        return torch.fake_quantize_per_channel_affine(
            x, self.scale, zp, self.axis % x.ndim, self.qmin, self.qmax
        )

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_qdq:
            return self._fake_quantize_op(x)
        s, z = self._view(self.scale, x), self._view(self.zero_point, x)
        r = round_ste(x / s) if _needs_grad(x) or s.requires_grad else torch.round(x / s)
        return (torch.clamp(r + z, self.qmin, self.qmax) - z) * s

    # -- calibration ---------------------------------------------------------------------------
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Scale and zero point that cover [lo, hi] (0 always representable)."""
        lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
        hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
        if self.symmetric:
            s = torch.maximum(lo.abs(), hi) / (2 ** (self.bits - 1) - 1)
            z = torch.zeros_like(s)
        else:
            s = (hi - lo) / (2**self.bits - 1)
            s = torch.where(s > 0, s, torch.full_like(s, 1e-8))
            z = torch.clamp(torch.round(-lo / s), 0, 2**self.bits - 1)
        s = torch.clamp(s, min=1e-8)
        self.scale.copy_(s.reshape(self.channels).to(self.scale.device))
        self.zero_point.copy_(z.reshape(self.channels).to(self.zero_point.device))

    def set_params(self, scale: torch.Tensor | float, zero_point: torch.Tensor | float = 0.0) -> Quantizer:
        self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32).expand(self.channels))
        self.zero_point.copy_(torch.as_tensor(zero_point, dtype=torch.float32).expand(self.channels))
        return self._done()

    @torch.no_grad()
    def calibrate(
        self,
        x: torch.Tensor,
        loss: Loss | None = None,
        method: str = "minmax",
        percentile: float | None = None,
        grid: int = 40,
        reference: torch.Tensor | None = None,
    ) -> UniformQuantizer:
        """Set (s, z) from ``x``.

        ``minmax``: the full range. ``percentile``: the [1 − p, p] percentiles; with ``p`` None, the
        best of p ∈ {0.999, 0.9999, 0.99999, 1} by MSE (RepQ-ViT's rule). ``mse`` (OMSE): the clip
        ratio α ∈ (0.2, 1] of the full range that minimizes the quantization MSE (per channel), or
        ``loss`` (e.g. the next layer's output error) for per-tensor quantizers.

        ``reference``: all the values when ``x`` is only the sample ``loss`` is computed on; the
        range, the percentiles and the candidates come from it (default: ``x``).
        """
        # Range, percentiles and MSE come from ALL values (exact tails + weighted sample of the
        # bulk, see CalibrationValues): clipping the largest weights / outlier activations (DINOv2's
        # high-norm tokens) costs accuracy even at 16 bits.
        source = x if reference is None else reference
        tail = 1 - percentile if method == "percentile" and percentile is not None else TAIL_FRACTION
        values = CalibrationValues(source, self.axis, self.channels, tail=tail)
        lo, hi = values.lo, values.hi
        if method == "minmax":
            self.set_range(lo, hi)
        elif method == "percentile" and percentile is not None:
            self.set_range(values.quantile(1 - percentile), values.quantile(percentile))
        elif method in ("percentile", "mse"):
            if method == "percentile":
                ps = (0.999, 0.9999, 0.99999)
                pairs = [(values.quantile(1 - p), values.quantile(p)) for p in ps] + [(lo, hi)]
            else:
                pairs = [(lo * a, hi * a) for a in torch.linspace(0.2, 1.0, grid).tolist()]
            self._pick(values, pairs, x, loss)
        else:
            raise VitkitError(f"uniform calibration method must be minmax, percentile or mse, got '{method}'")
        return self._done()

    def _pick(self, values: CalibrationValues, pairs, x, loss) -> None:
        if loss is not None and self.channels == 1:

            def apply(c):
                self.set_range(c["lo"], c["hi"])
                return self._fake(x)

            best = _search([{"lo": a, "hi": b} for a, b in pairs], apply, loss)
            self.set_range(best["lo"], best["hi"])
            return
        # Per row (channel): the candidate with the smallest quantization MSE of that row.
        rows = values.rows
        best_err = torch.full((self.channels,), math.inf, device=rows.device)
        best_lo, best_hi = pairs[-1][0].clone(), pairs[-1][1].clone()
        for lo, hi in pairs:
            self.set_range(lo, hi)
            s, z = self.scale[:, None], self.zero_point[:, None]
            xhat = (torch.clamp(torch.round(rows / s) + z, self.qmin, self.qmax) - z) * s
            err = values.mean((xhat - rows).pow(2))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo.expand_as(best_lo), best_lo)
            best_hi = torch.where(better, hi.expand_as(best_hi), best_hi)
        self.set_range(best_lo, best_hi)

    def extra_repr(self) -> str:
        gran = "tensor" if self.channels == 1 else f"{self.channels} channels (axis {self.axis})"
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {gran}"


class _LogBase(Quantizer):
    """Shared code of the log quantizers: code 2^b − 1 stands for 0, codes 0..2^b − 2 are levels."""

    @property
    def max_code(self) -> int:
        return 2**self.bits - 2

    def _codes(self, ratio: torch.Tensor, per_code: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, zero mask) for ``ratio`` = x / scale in (0, 1]: code ≈ −log2(ratio)·per_code."""
        with torch.no_grad():
            c = torch.round(-torch.log2(ratio.clamp_min(1e-38)) * per_code)
            zero = (ratio <= 0) | (c > self.max_code)
            return torch.clamp(c, 0, self.max_code), zero


class Log2Quantizer(_LogBase):
    """x̂ = Δ·2^(−q), q = round(−log2(x/Δ)) ∈ [0, 2^b − 2]; values below the smallest level → 0.

    For non-negative inputs (post-softmax). Δ is searched among max·2^(−i/4).
    """

    kind = "log2"

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer("scale", torch.ones(()))

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        c, zero = self._codes(x / self.scale, 1.0)
        xhat = torch.where(zero, torch.zeros_like(x), self.scale * _pow2_neg(c))
        return _pass_through(x, xhat)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, loss: Loss | None = None) -> Log2Quantizer:
        top = float(x.detach().max().clamp_min(1e-8))  # the true maximum, not a subsample's
        loss = loss or (lambda xhat: (xhat - x).pow(2).mean())
        cands = [{"scale": top * 2 ** (-i / 4)} for i in range(9)]

        def apply(c):
            self.scale.fill_(c["scale"])
            return self._fake(x)

        self.scale.fill_(_search(cands, apply, loss)["scale"])
        return self._done()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={float(self.scale):.4g}"


class LogSqrt2Quantizer(_LogBase):
    """RepQ-ViT's log√2 quantizer: q = round(−2·log2(x/Δ)),
    x̂ = Δ·2^(−⌈q/2⌉)·(1 + (√2 − 1)·(q mod 2)) (= Δ·2^(−q/2), read out with shifts and one constant)."""

    kind = "logsqrt2"

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer("scale", torch.ones(()))

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        c, zero = self._codes(x / self.scale, 2.0)
        odd = torch.remainder(c, 2)
        level = _pow2_neg(torch.ceil(c / 2)) * (1 + (math.sqrt(2) - 1) * odd)
        xhat = torch.where(zero, torch.zeros_like(x), self.scale * level)
        return _pass_through(x, xhat)

    calibrate = Log2Quantizer.calibrate  # same Δ search
    extra_repr = Log2Quantizer.extra_repr


class AdaLogQuantizer(_LogBase):
    """AdaLog: log base a = 2^(q/r) (r = 37 fixed, integer q searched in 10..137).

    Codes c = round(−log2(x'/s)·r/q); read-out x̂' = s·2^(−⌊cq/r⌋)·T[(cq) mod r] with
    T[j] = round(2^(−j/r)·(2^(b+1) − 2))/(2^(b+1) − 2) (shifts and a small table). With q = r the base
    is 2 and the quantizer equals :class:`Log2Quantizer`.

    Post-GELU: x' = x + η with η = −min GELU, so x' ≥ 0; the output is x̂' − η unless the shift has
    been folded into the next layer's bias (``shift_folded``), then it is x̂'.
    """

    kind = "adalog"
    R = 37

    def __init__(self, bits: int, shift: float = 0.0):
        super().__init__(bits)
        self.register_buffer("q", torch.tensor(self.R, dtype=torch.int64))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift", torch.tensor(float(shift)))
        self.register_buffer("shift_folded", torch.zeros((), dtype=torch.bool))
        denom = 2 ** (bits + 1) - 2
        table = torch.round(2 ** (-torch.arange(self.R, dtype=torch.float64) / self.R) * denom) / denom
        self.register_buffer("table", table.float())

    @property
    def base(self) -> float:
        return 2 ** (int(self.q) / self.R)

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        xs = x + self.shift
        q = int(self.q)
        c, zero = self._codes(xs / self.scale, self.R / q)
        cq = c.to(torch.int64) * q
        level = _pow2_neg(torch.div(cq, self.R, rounding_mode="floor")) * self.table[cq % self.R]
        xhat = torch.where(zero, torch.zeros_like(xs), self.scale * level)
        if bool(self.shift_folded):  # the next layer's bias already subtracts W·η
            return _pass_through(xs, xhat)
        return _pass_through(x, xhat - self.shift)

    @torch.no_grad()
    def calibrate(
        self,
        x: torch.Tensor,
        loss: Loss | None = None,
        fixed_scale: float | None = None,
        reference: torch.Tensor | None = None,
    ) -> AdaLogQuantizer:
        """Coarse-to-fine search of the base q (and of the scale unless ``fixed_scale``, e.g. 1 for
        post-softmax): q on a stride-4 grid then ±3 around the best, alternating with scale
        candidates in the top percentiles of x + η (a simplification of AdaLog's FPCS).
        ``reference``: all the values when ``x`` is only the sample ``loss`` is computed on."""
        if bool(self.shift_folded):
            raise VitkitError("AdaLogQuantizer: cannot recalibrate after its shift was folded into a bias")
        loss = loss or (lambda xhat: (xhat - x).pow(2).mean())
        source = x if reference is None else reference
        xs = subsample(source) + float(self.shift)
        top = float((source.detach().max() + float(self.shift)).clamp_min(1e-8))  # the true max
        scales = (
            [fixed_scale]
            if fixed_scale is not None
            else sorted(
                {float(_quantile(xs[None], p)[0]) for p in torch.linspace(0.9, 1.0, 12).tolist()} | {top}
            )
        )
        self.scale.fill_(fixed_scale if fixed_scale is not None else top)

        def apply(c):
            self.q.fill_(c["q"])
            self.scale.fill_(c["scale"])
            return self._fake(x)

        best = {"q": self.R, "scale": float(self.scale)}
        for _ in range(1 if fixed_scale is not None else 2):
            coarse = [{"q": q, "scale": best["scale"]} for q in range(10, 138, 4)]
            best = _search(coarse, apply, loss)
            fine = [
                {"q": q, "scale": best["scale"]}
                for q in range(max(best["q"] - 3, 10), min(best["q"] + 4, 138))
            ]
            best = _search(fine, apply, loss)
            if fixed_scale is None:
                best = _search([{"q": best["q"], "scale": s} for s in scales], apply, loss)
        apply(best)
        return self._done()

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, base=2^({int(self.q)}/{self.R})={self.base:.4f}, scale={float(self.scale):.4g}, "
            f"shift={float(self.shift):.5g}{' (folded)' if bool(self.shift_folded) else ''}"
        )


class TwinUniformQuantizer(Quantizer):
    """PTQ4ViT twin uniform quantizer: two uniform ranges, each value quantized in exactly ONE.

    ``mode="softmax"`` (values in [0, 1]): k = 2^(b−1) levels per region; R2 = [split, 1] with
    Δ2 = 1/(k − 1), R1 = [0, split) with Δ1 = split/(k − 1); split = 2^(−i) searched.
    ``mode="gelu"``: negative values on Δn = η/k (η = −min GELU) with levels [−k, 0], positive values
    on Δp = 2^m·Δn with levels [0, k − 1]; m searched (MPTQ-ViT's OPT-m; power-of-two ratio).
    One bit selects the region, b − 1 bits the level.
    """

    kind = "twin"

    def __init__(self, bits: int, mode: str = "softmax"):
        super().__init__(bits)
        if mode not in ("softmax", "gelu"):
            raise VitkitError(f"TwinUniformQuantizer mode must be 'softmax' or 'gelu', got '{mode}'")
        self.mode = mode
        self.register_buffer("split", torch.tensor(1.0 / 64))  # softmax: R1/R2 boundary
        self.register_buffer("pos_scale", torch.tensor(1.0))  # gelu: Δp

    @property
    def k(self) -> int:
        return 2 ** (self.bits - 1)

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        if self.mode == "softmax":
            d2 = 1.0 / (k - 1)
            d1 = self.split / (k - 1)
            hi = torch.clamp(torch.round(x / d2), 0, k - 1) * d2
            lo = torch.clamp(torch.round(x / d1), 0, k - 1) * d1
            xhat = torch.where(x < self.split, lo, hi)
        else:
            dn = GELU_MIN / k
            neg = torch.clamp(torch.round(x / dn), -k, 0) * dn
            pos = torch.clamp(torch.round(x / self.pos_scale), 0, k - 1) * self.pos_scale
            xhat = torch.where(x < 0, neg, pos)
        return _pass_through(x, xhat)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, loss: Loss | None = None) -> TwinUniformQuantizer:
        loss = loss or (lambda xhat: (xhat - x).pow(2).mean())
        if self.mode == "softmax":
            cands = [{"split": 2.0 ** (-i)} for i in range(20)]

            def apply(c):
                self.split.fill_(c["split"])
                return self._fake(x)

            self.split.fill_(_search(cands, apply, loss)["split"])
        else:
            dn = GELU_MIN / self.k
            cands = [{"m": m} for m in range(-4, 21)]

            def apply(c):
                self.pos_scale.fill_(dn * 2.0 ** c["m"])
                return self._fake(x)

            apply(_search(cands, apply, loss))
        return self._done()

    def extra_repr(self) -> str:
        extra = (
            f"split={float(self.split):.3g}" if self.mode == "softmax" else f"Δp={float(self.pos_scale):.4g}"
        )
        return f"bits={self.bits}, mode={self.mode}, {extra}"


class ShiftLog2Quantizer(Quantizer):
    """I&S-ViT's shift-uniform-log2 quantizer (SULQ), post-softmax:
    y = log2(x + η), q = clamp(round((y − m)/Δ), 0, 2^b − 1), x̂ = 2^(qΔ + m) − η,
    with [m, M] the calibration range of y and Δ = (M − m)/(2^b − 1) in search AND forward.
    ``integer_exponent=True`` rounds the exponent (their power-of-two read-out; wastes levels)."""

    kind = "shiftlog2"
    ETAS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)

    def __init__(self, bits: int, integer_exponent: bool = False):
        super().__init__(bits)
        self.integer_exponent = bool(integer_exponent)
        self.register_buffer("eta", torch.tensor(0.01))
        self.register_buffer("lo", torch.tensor(math.log2(0.01)))
        self.register_buffer("step", torch.tensor(1.0))

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.log2(x.clamp_min(0) + self.eta)
        q = torch.clamp(torch.round((y - self.lo) / self.step), 0, 2**self.bits - 1)
        e = q * self.step + self.lo
        if self.integer_exponent:
            e = torch.round(e)
        return _pass_through(x, torch.exp2(e) - self.eta)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, loss: Loss | None = None) -> ShiftLog2Quantizer:
        loss = loss or (lambda xhat: (xhat - x).pow(2).mean())
        xs = x.detach().float().clamp_min(0)
        lo_x, hi_x = float(xs.min()), float(xs.max())  # the full range, not a subsample's

        def params(eta: float) -> dict:
            m, big = math.log2(lo_x + eta), math.log2(hi_x + eta)
            return {"eta": eta, "lo": m, "step": max(big - m, 1e-6) / (2**self.bits - 1)}

        def apply(c):
            self.eta.fill_(c["eta"])
            self.lo.fill_(c["lo"])
            self.step.fill_(c["step"])
            return self._fake(x)

        apply(_search([params(e) for e in self.ETAS], apply, loss))
        return self._done()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, eta={float(self.eta):.3g}, integer_exponent={self.integer_exponent}"


class TanQuantizer(Quantizer):
    """DopQ-ViT TanQ (our reading, see module docstring): uniform codes in t = tan(θ(2x − 1))/tan θ
    ∈ [−1, 1]; levels x = ½ + atan(t·tan θ)/(2θ) are dense near 0 and near 1; θ ∈ (0, π/2) searched."""

    kind = "tan"

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer("theta", torch.tensor(1.0))

    def _fake(self, x: torch.Tensor) -> torch.Tensor:
        th = self.theta
        tan_th = torch.tan(th)
        t = torch.tan(th * (2 * x.clamp(0, 1) - 1)) / tan_th
        n = 2**self.bits - 1
        code = torch.clamp(torch.round((t + 1) / 2 * n), 0, n)
        that = 2 * code / n - 1
        return _pass_through(x, 0.5 + torch.atan(that * tan_th) / (2 * th))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, loss: Loss | None = None) -> TanQuantizer:
        loss = loss or (lambda xhat: (xhat - x).pow(2).mean())
        cands = [{"theta": t} for t in torch.linspace(0.05, 1.565, 40).tolist()]

        def apply(c):
            self.theta.fill_(c["theta"])
            return self._fake(x)

        apply(_search(cands, apply, loss))
        return self._done()

    def levels(self) -> torch.Tensor:
        """The 2^b reconstruction levels."""
        n = 2**self.bits - 1
        t = 2 * torch.arange(n + 1, dtype=torch.float32, device=self.theta.device) / n - 1
        return 0.5 + torch.atan(t * torch.tan(self.theta)) / (2 * self.theta)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, theta={float(self.theta):.4f}"


QUANTIZERS: dict[str, type[Quantizer]] = {
    q.kind: q
    for q in (
        UniformQuantizer,
        Log2Quantizer,
        LogSqrt2Quantizer,
        AdaLogQuantizer,
        TwinUniformQuantizer,
        ShiftLog2Quantizer,
        TanQuantizer,
    )
}


def int8_blockers(model: nn.Module) -> list[str]:
    """Names (and kinds) of the quantizers onnxruntime cannot run as INT8 QDQ."""
    out = []
    for name, q in model.named_modules():
        if isinstance(q, Quantizer) and not (isinstance(q, UniformQuantizer) and q.bits == 8):
            out.append(f"{name} ({type(q).__name__}, {q.bits} bits)")
    return out


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer of the model by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    for q in quantizers(model).values():
        q.enabled = enabled

"""Integer-only non-linear operations of I-ViT (Li & Gu, "I-ViT: Integer-only Quantization for Efficient
Vision Transformer Inference", ICCV 2023): Shiftmax, ShiftGELU, I-LayerNorm, dyadic requantization.

What changes in the model (method ``ivit``): the attention Softmax becomes :class:`IntSoftmax`, every
``nn.GELU`` becomes :class:`IntGELU` and every ``nn.LayerNorm`` becomes :class:`IntLayerNorm` (same
``weight``/``bias`` parameter names). Each takes a float tensor, quantizes it once with a calibrated
per-tensor scale (the I-ViT "QuantAct" boundary), runs the op in **int64 arithmetic only** (shifts,
integer adds/multiplies/divisions; no float inside), and dequantizes the integer result.

Simplified / our reading:
* post-training (min-max scales), no QAT; the linear layers around them are simulated uniform
  symmetric quantizers (``layers.py``), so the model is integer-only *inside* the non-linear ops;
* I-LayerNorm applies γ/β in float after the integer normalisation (I-ViT folds them into the scale);
  its mean is exact and rows are pre-shifted for sqrt precision (our own fix, see ``int_layernorm``);
* fixes of the public code: the integer square root starts Newton from 2^⌈bitlen(V)/2⌉ and iterates
  to convergence (theirs starts at 2^16 for 10 steps: isqrt(1) = 64); Shiftmax outputs 16 bits by
  default (8-bit output floors small probabilities to 0, rows then sum well below 1); ShiftGELU uses
  m = max(row max, 0) so both exponent arguments stay ≤ 0 (theirs can shift by a negative amount).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.compress.quant.quantizers import Quantizer, set_quantizers_enabled

INT32_MAX = 2**31 - 1


# -- integer arithmetic -------------------------------------------------------------------------
def dyadic(ratio: float) -> tuple[int, int]:
    """(M, shift) with M / 2^shift ≈ ratio, M a 31-bit integer: relative error < 2^-30."""
    if not ratio > 0:
        raise ValueError(f"dyadic ratio must be positive, got {ratio}")
    m, e = math.frexp(ratio)
    big = round(m * 2**31)
    shift = 31 - e
    if big == 2**31:
        big, shift = big // 2, shift - 1
    return big, shift


def requantize(i: torch.Tensor, multiplier: int, shift: int, bits: int = 8) -> torch.Tensor:
    """round(i · M / 2^shift) clamped to signed ``bits`` — integer only (round half up)."""
    _int(i)
    if shift > 0:
        out = (i * multiplier + (1 << (shift - 1))) >> shift
    else:
        out = (i * multiplier) << (-shift)
    lim = 2 ** (bits - 1)
    return out.clamp(-lim + 1, lim - 1)


def bit_length(v: torch.Tensor) -> torch.Tensor:
    """Bit length of int64 ``v`` ≥ 0 (0 for 0), by binary search on shifts (integer only)."""
    _int(v)
    bitlen = torch.zeros_like(v)
    t = v.clone()
    for s in (32, 16, 8, 4, 2, 1):
        big = t >= (1 << s)
        bitlen = torch.where(big, bitlen + s, bitlen)
        t = torch.where(big, t >> s, t)
    return bitlen + (t > 0).to(torch.int64)


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """⌊√v⌋ for int64 v ≥ 0: Newton from above, starting at 2^⌈bitlen(v)/2⌉ (≥ √v), to convergence."""
    _int(v)
    v = v.clamp_min(0)
    safe = v.clamp_min(1)  # Newton on 0 would reach k = 0 and divide by it
    k = torch.ones_like(v) << ((bit_length(safe) + 1) >> 1)
    for _ in range(64):
        nxt = (k + safe // k) >> 1
        if bool((nxt >= k).all()):
            break
        k = torch.minimum(nxt, k)
    return torch.where(v == 0, torch.zeros_like(v), k)


def int_exp_shift(i: torch.Tensor, scale: float, n: int) -> torch.Tensor:
    """≈ 2^n·e^(i·scale)/… for int64 i ≤ 0 (I-ViT's shift exp): x·log2 e by i + i>>1 − i>>4, then
    2^(−q)·2^(r·scale) with 2^p ≈ 1 + p/2 on p ∈ (−1, 0]."""
    _int(i)
    i = i + (i >> 1) - (i >> 4)
    i0 = math.floor(-1.0 / scale)  # negative integer
    i = torch.maximum(i, torch.full_like(i, n * i0))
    q = torch.div(i, i0, rounding_mode="floor")  # 0..n
    r = i - q * i0  # (i0, 0]
    e = ((r - 2 * i0) << (n - q)) >> 1  # floor((r/2 − i0)·2^(n−q)), exactly
    return e.clamp_min(0)


def shiftmax(
    i: torch.Tensor, scale: float, output_bits: int = 16, n: int = 15, dim: int = -1
) -> torch.Tensor:
    """Integer softmax of int64 logits ``i`` (scale ``scale``); output codes with scale 2^−(bits−1)."""
    _int(i)
    i = i - i.amax(dim=dim, keepdim=True)
    e = int_exp_shift(i, scale, n)
    total = e.sum(dim=dim, keepdim=True).clamp(1, INT32_MAX)
    factor = INT32_MAX // total
    return (e * factor) >> (31 - output_bits + 1)


def shift_gelu(
    i: torch.Tensor, scale: float, output_bits: int = 8, n: int = 23
) -> tuple[torch.Tensor, float]:
    """Integer GELU(x) ≈ x·σ(1.702x) of int64 ``i`` (scale ``scale``); returns (codes, their scale)."""
    _int(i)
    s_sig = scale * 1.702
    m = i.amax(dim=-1, keepdim=True).clamp_min(0)
    e1 = int_exp_shift(i - m, s_sig, n)
    e2 = int_exp_shift(-m, s_sig, n)
    total = (e1 + e2).clamp(1, INT32_MAX)
    factor = INT32_MAX // total
    sig = (e1 * factor) >> (31 - output_bits + 1)
    return i * sig, scale / 2 ** (output_bits - 1)


def int_layernorm(i: torch.Tensor) -> torch.Tensor:
    """Integer normalisation over the last axis: codes y with x̂ = y·√D/2^30 ≈ (x − μ)/σ.

    Two precision fixes over I-ViT's code (our own): the mean is exact (y = D·i − Σi, no rounded
    μ) and each row is shifted left so that max|y| has about (62 − bitlen D)/2 bits before the
    integer sqrt, so rows of small variance keep full precision (the sum of squares stays < 2^62).
    Inputs must be at most 16-bit codes with D ≤ 1024 (ViT-L width).
    """
    _int(i)
    d = i.shape[-1]
    y = i * d - i.sum(-1, keepdim=True)
    target = (62 - d.bit_length()) // 2
    shift = (target - bit_length(y.abs().amax(-1, keepdim=True))).clamp_min(0)
    y = y << shift
    var_sum = (y * y).sum(-1, keepdim=True)
    k = isqrt(var_sum).clamp_min(1)
    return torch.div(y << 30, k, rounding_mode="floor")  # |y| < 2^31 so y·2^30 fits in int64


def _int(t: torch.Tensor) -> None:
    if t.dtype != torch.int64:
        raise TypeError(f"integer-only op got {t.dtype}, expected int64")


def _to_int(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lim = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), -lim, lim).to(torch.int64)


# -- modules ------------------------------------------------------------------------------------
class IntOp(Quantizer):
    """Base of the integer ops: quantize the input with a calibrated symmetric per-tensor scale."""

    kind = "int"

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer("in_scale", torch.ones(()))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, loss=None) -> IntOp:
        finite = x[torch.isfinite(x)]
        amax = float(finite.abs().max()) if finite.numel() else 1.0
        self.in_scale.fill_(max(amax, 1e-8) / (2 ** (self.bits - 1) - 1))
        return self._done()

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self._float(x)
        if not bool(self.calibrated):
            return Quantizer.forward(self, x)  # raises the "not calibrated" error
        return self._int_forward(x)

    def _int_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_bits={self.bits}, in_scale={float(self.in_scale):.4g}"


class IntSoftmax(IntOp):
    """Shiftmax over ``dim``: 8-bit logits in, ``output_bits`` (16 by default) probabilities out."""

    def __init__(self, output_bits: int = 16, dim: int = -1, in_bits: int = 8):
        super().__init__(in_bits)
        self.output_bits = int(output_bits)
        self.dim = dim

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=self.dim)

    def _int_forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = shiftmax(
            _to_int(x, self.in_scale, self.bits), float(self.in_scale), self.output_bits, dim=self.dim
        )
        return codes.to(x.dtype) * 2.0 ** -(self.output_bits - 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_bits={self.output_bits}"


class IntGELU(IntOp):
    """ShiftGELU: 8-bit input; the integer result is requantized (dyadic) onto ``out_scale`` when set
    (the next layer's input scale), otherwise dequantized directly."""

    def __init__(self, in_bits: int = 8):
        super().__init__(in_bits)
        self.register_buffer("out_scale", torch.zeros(()))

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)

    def _int_forward(self, x: torch.Tensor) -> torch.Tensor:
        y, s = shift_gelu(_to_int(x, self.in_scale, self.bits), float(self.in_scale))
        out_scale = float(self.out_scale)
        if out_scale > 0:
            m, shift = dyadic(s / out_scale)
            return requantize(y, m, shift, 8).to(x.dtype) * out_scale
        return y.to(x.dtype) * s


class IntLayerNorm(IntOp):
    """I-LayerNorm: 16-bit input (the residual stream), integer mean/variance/sqrt; γ, β in float."""

    def __init__(self, source: nn.LayerNorm, in_bits: int = 16):
        super().__init__(in_bits)
        self.normalized_shape = source.normalized_shape
        self.eps = source.eps
        self.weight = source.weight
        self.bias = source.bias

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def _int_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int_layernorm(_to_int(x, self.in_scale, self.bits))
        out = y.to(x.dtype) * (math.sqrt(x.shape[-1]) / 2**30)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


def install_integer_ops(model: nn.Module, points=None) -> None:
    """Replace every ``nn.LayerNorm`` and ``nn.GELU`` of ``model`` (by type) with the integer ops."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                setattr(parent, name, IntLayerNorm(child))
            elif type(child) is nn.GELU:
                setattr(parent, name, IntGELU())


@torch.no_grad()
def calibrate_integer_ops(model: nn.Module, images: torch.Tensor, batch: int) -> int:
    """Input scales of the IntGELU / IntLayerNorm modules from a float pass (running max of |x|);
    then link each IntGELU's output to the symmetric input quantizer of the layer it feeds."""
    ops = [m for m in model.modules() if isinstance(m, (IntGELU, IntLayerNorm))]
    amax = {id(m): 0.0 for m in ops}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, a: amax.__setitem__(id(mod), max(amax[id(mod)], float(a[0].abs().max())))
        )
        for m in ops
    ]
    set_quantizers_enabled(model, False)
    dev = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch):
            model(images[i : i + batch].to(dev))
    finally:
        for h in handles:
            h.remove()
        set_quantizers_enabled(model, True)
    for m in ops:
        m.in_scale.fill_(max(amax[id(m)], 1e-8) / (2 ** (m.bits - 1) - 1))
        m._done()
    for mlp in model.modules():
        act, fc2 = getattr(mlp, "act", None), getattr(mlp, "fc2", None)
        q = getattr(fc2, "input_quantizer", None)
        if isinstance(act, IntGELU) and getattr(q, "symmetric", False) and getattr(q, "channels", 0) == 1:
            act.out_scale.copy_(q.scale.reshape(()))
    return len(ops)

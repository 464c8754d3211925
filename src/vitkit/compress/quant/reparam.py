"""Post-LayerNorm scale reparameterizations, as library functions.

* :func:`reparam_post_ln` — RepQ-ViT (Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training
  Quantization of Vision Transformers", ICCV 2023): per-channel activation quantization parameters
  (s_c, z_c) of a LayerNorm's output are turned into one per-tensor pair (s̃, z̃) by moving the ratios
  into the LayerNorm affine and the next Linear's weight columns and bias. ``target="median"`` is
  DopQ-ViT's MOSF (the scale that minimises the mean absolute deviation to the channel scales is
  their median — our reading of the paper; it has no public code).
* :func:`smooth_post_ln` — SmoothQuant with a bias term (MPTQ-ViT "SQ-b", arXiv 2401.14895, no public
  code; our reading): per input channel shift z_j = (max_j + min_j)/2 and scale
  s_j = max|X_j − z_j|^α / max|W_:,j|^(1−α), folded into the LayerNorm and the next Linear.

What changes in the model: LayerNorm γ/β and the next Linear's weight/bias; the float function of the
model is unchanged (tested to 1e-5). Deviation from RepQ's code: the mean zero point z̃ is rounded
(as AdaLog does), so per-channel and per-tensor quantization give identical codes (exact
equivalence); RepQ keeps it fractional, which makes its reparameterization approximate.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkit.errors import VitkitError


def _check_pair(norm: nn.Module, linear: nn.Linear) -> None:
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        raise VitkitError(
            f"reparameterization needs a LayerNorm with affine weight and bias, got {type(norm).__name__}"
        )
    if not isinstance(linear, nn.Linear) or linear.in_features != norm.weight.numel():
        raise VitkitError("reparameterization needs the Linear fed by the LayerNorm (matching features)")


@torch.no_grad()
def reparam_post_ln(
    norm: nn.LayerNorm,
    linear: nn.Linear,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    target: str = "mean",
    round_zero_point: bool = True,
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Fold per-channel (scale, zero_point) of ``norm``'s output into ``norm`` and ``linear``.

    After the call the LayerNorm outputs x' = x / r − b (r_c = s_c/s̃, b_c = min_c/r_c − min̄) and the
    Linear computes the same function of its original input. Returns (s̃, z̃, r, b): quantizing x'
    per tensor with (s̃, z̃) gives the same codes as quantizing x per channel with (s_c, z_c).
    """
    _check_pair(norm, linear)
    s = scale.detach().double().reshape(-1)
    z = zero_point.detach().double().reshape(-1)
    if target == "mean":
        s_t, z_t = s.mean(), z.mean()
    elif target == "median":
        s_t, z_t = s.median(), z.median()
    else:
        raise VitkitError(f"reparameterization target must be 'mean' or 'median', got '{target}'")
    if round_zero_point:
        z_t = torch.round(z_t)
    lo_c = -z * s
    lo_t = -z_t * s_t
    r = s / s_t
    b = lo_c / r - lo_t
    _apply_affine(norm, linear, 1.0 / r, -b)
    return float(s_t), float(z_t), r.float(), b.float()


@torch.no_grad()
def smooth_post_ln(
    norm: nn.LayerNorm, linear: nn.Linear, x: torch.Tensor, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """SQ-b on ``norm`` → ``linear`` from calibration activations ``x`` (..., C) of the LayerNorm
    output. Afterwards the LayerNorm outputs (x − z)/s. Returns (s, z)."""
    _check_pair(norm, linear)
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    hi, lo = rows.max(0).values, rows.min(0).values
    z = (hi + lo) / 2
    act = (torch.maximum(hi - z, z - lo)).clamp_min(1e-5)
    wmax = linear.weight.detach().double().abs().amax(0).clamp_min(1e-5)
    s = (act**alpha / wmax ** (1 - alpha)).clamp_min(1e-5)
    _apply_affine(norm, linear, 1.0 / s, -z / s)
    return s.float(), z.float()


def _apply_affine(norm: nn.LayerNorm, linear: nn.Linear, a: torch.Tensor, c: torch.Tensor) -> None:
    """Make ``norm`` output x·a + c and ``linear`` compensate: W ← W·diag(1/a), bias ← bias − W_new·c."""
    a64, c64 = a.double(), c.double()
    g, beta = norm.weight.double(), norm.bias.double()
    norm.weight.copy_((g * a64).to(norm.weight.dtype))
    norm.bias.copy_((beta * a64 + c64).to(norm.bias.dtype))
    w_new = linear.weight.double() / a64[None, :]
    shift = w_new @ c64
    linear.weight.copy_(w_new.to(linear.weight.dtype))
    if linear.bias is None:
        linear.bias = nn.Parameter(
            torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
        )
    linear.bias.copy_((linear.bias.double() - shift).to(linear.bias.dtype))

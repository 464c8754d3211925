"""Edge-MoE's arithmetic approximations as drop-in ops — Sarkar et al., "Edge-MoE: Memory-Efficient
Multi-Task Vision Transformer Architecture with Task-level Sparsity via Mixture-of-Experts" (ICCAD
2023), from sharc-lab/Edge-MoE (``src/attention.cpp``, ``src/gelu.cpp``), as the paper notes
transcribe them. The FPGA accelerator itself (Vitis HLS, fixed point) is out of scope.

- **Single-pass softmax** (:class:`SinglePassSoftmax`): per query row, one streaming pass over the
  scores keeps a running maximum ``m`` and sum ``s`` (a new score ``a > m``: ``s <- s e^(m-a) + 1``,
  ``m <- a``; else ``s <- s + e^(a-m)``), then ``alpha_j = e^(a_j - m) / s``: the exact softmax
  computed the way the accelerator streams keys (one pass for the statistics, none stored). Here in
  float32, key by key (vectorised over rows and heads); a graph export falls back to ``softmax``,
  the same function.
- **GELU by table** (:class:`TableGELU`): ``GELU(x) = ReLU(x) - delta(|x|)`` with ``delta(t) = t Phi(-t)``
  tabulated at ``t = i/32``, ``i = 0..176`` (|x| < 5.5), linear interpolation between entries, and
  ReLU beyond; the last entry is 0 (as in the code) so the switch to ReLU is continuous. The table is
  computed here from the formula (the code's literals agree to their printed digits: 0, 0.015235,
  0.029693, ...).

``apply_edge_approx`` swaps them into a ViT by type (vitkit's attention ``Softmax`` modules, the
MLPs' ``nn.GELU``); registered as ``edge_approx`` so a run records it.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import record_transform
from vitkit.models.attention import Softmax, attention_modules
from vitkit.registry import AS_IS, Technique, register

TABLE_STEP = 1 / 32
TABLE_SIZE = 177  # t = 0 .. 5.5


def single_pass_softmax(a: torch.Tensor) -> torch.Tensor:
    """Edge-MoE's streaming softmax over the last axis (see the module docstring)."""
    a = a.float()
    m = torch.full(a.shape[:-1], -math.inf, dtype=a.dtype, device=a.device)
    s = torch.zeros_like(m)
    for j in range(a.shape[-1]):
        x = a[..., j]
        bigger = x > m
        s = torch.where(bigger, s * torch.exp(m - x) + 1, s + torch.exp(x - m))
        m = torch.where(bigger, x, m)
    return torch.exp(a - m[..., None]) / s[..., None]


class SinglePassSoftmax(Softmax):
    """vitkit's attention ``Softmax`` slot filled with the single-pass algorithm (last axis)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim not in (-1, x.ndim - 1):
            raise VitkitError("single-pass softmax runs over the last axis (the keys)")
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return x.softmax(dim=-1)  # the same function; a graph need not unroll the key loop
        return single_pass_softmax(x).to(x.dtype)


def gelu_delta_table() -> torch.Tensor:
    """delta(t) = t Phi(-t) at t = i/32, i = 0..176, the last entry 0 (continuity with ReLU)."""
    t = torch.arange(TABLE_SIZE, dtype=torch.float64) * TABLE_STEP
    delta = t * 0.5 * torch.erfc(t / math.sqrt(2))
    delta[-1] = 0.0
    return delta.float()


class TableGELU(nn.Module):
    """GELU as ReLU minus a tabulated, linearly interpolated correction (Edge-MoE's gelu.cpp)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", gelu_delta_table(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.abs() / TABLE_STEP
        i = t.floor().clamp(max=TABLE_SIZE - 2)
        frac = (t - i).clamp(max=1.0)
        i = i.long()
        lo, hi = self.table[i], self.table[i + 1]
        delta = lo + (hi - lo) * frac
        delta = torch.where(x.abs() >= (TABLE_SIZE - 1) * TABLE_STEP, torch.zeros_like(delta), delta)
        return torch.relu(x) - delta.to(x.dtype)


class EdgeApproxConfig(BaseModel):
    """``edge_approx``: which of Edge-MoE's approximations to swap in."""

    model_config = ConfigDict(extra="forbid")

    softmax: bool = Field(True, description="the single-pass softmax in every attention")
    gelu: bool = Field(True, description="the table GELU in every MLP")


def apply_edge_approx(model: nn.Module, cfg: EdgeApproxConfig | dict | None = None) -> nn.Module:
    cfg = EdgeApproxConfig(**cfg) if isinstance(cfg, dict) else (cfg or EdgeApproxConfig())
    swapped = 0
    if cfg.softmax:
        for attn in attention_modules(model):
            if type(attn.softmax) is not Softmax:
                raise VitkitError("edge_approx: an attention's softmax is already replaced (quantized?)")
            attn.softmax = SinglePassSoftmax(attn.softmax.dim)
            swapped += 1
    if cfg.gelu:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.GELU:
                    setattr(parent, name, TableGELU())
                    swapped += 1
    if not swapped:
        raise VitkitError("edge_approx: the model has no vitkit attention softmax and no nn.GELU to replace")
    record_transform(model, "edge_approx", cfg.model_dump())
    return model


def replay_edge_approx(model: nn.Module, config: dict) -> nn.Module:
    return apply_edge_approx(model, EdgeApproxConfig(**config))


register(
    Technique(
        name="edge_approx",
        summary="Edge-MoE's single-pass softmax and table GELU swapped in (what the FPGA computes)",
        paper='Sarkar et al., "Edge-MoE: Memory-Efficient Multi-Task Vision Transformer Architecture ..." (2023)',
        config=EdgeApproxConfig,
        replay=replay_edge_approx,
        export=AS_IS,
        quantize="its single-pass softmax fills the attention's Softmax slot that the post-softmax quantizer "
        "takes (quantize the model without edge_approx: the approximations model an FPGA's datapath)",
        family="compress",
        verb="vitkit.compress.approx.apply_edge_approx(model)",
    )
)

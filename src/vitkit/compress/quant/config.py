"""The quantization config (what a user chooses) and the method table (what each method means).

Per-layer bit-widths are data: ``layer_bits`` maps module-name patterns (``fnmatch``, e.g.
``"blocks.*.mlp.fc2"``) to bits; matched points use those bits for their weight and activation.
The resolved ``{module: {"w": bits, "a": bits}}`` map is recorded in the manifest.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vitkit.compress.quant.quantizers import MAX_BITS, MIN_BITS, check_bits
from vitkit.errors import VitkitError
from vitkit.registry import parse_config


@dataclass(frozen=True)
class Method:
    """What a PTQ method picks at each quantization point."""

    paper: str
    act_calib: str  # uniform activation calibration: minmax | percentile | mse
    weight_calib: str  # uniform weight calibration
    softmax: str  # post-softmax quantizer kind
    gelu: str  # post-GELU (fc2 input) quantizer kind
    symmetric: bool = False
    reparam: str | None = None  # post-LN scale reparameterization target: mean | median
    per_head: bool = False  # q / k / v quantized per head
    output_loss: bool = False  # activation searches minimise the next layer's output error
    integer_ops: bool = False  # I-ViT Shiftmax / ShiftGELU / I-LayerNorm


METHODS: dict[str, Method] = {
    "minmax": Method("baseline", "minmax", "minmax", "uniform", "uniform"),
    "percentile": Method("baseline", "percentile", "minmax", "uniform", "uniform"),
    "omse": Method("OMSE (Choukroun et al., 2019)", "mse", "mse", "uniform", "uniform"),
    "ptq4vit": Method("PTQ4ViT (ECCV 2022)", "mse", "mse", "twin", "twin", symmetric=True, output_loss=True),
    "repq": Method("RepQ-ViT (ICCV 2023)", "percentile", "percentile", "logsqrt2", "uniform", reparam="mean"),
    "adalog": Method(
        "AdaLog (ECCV 2024)",
        "mse",
        "mse",
        "adalog",
        "adalog",
        reparam="mean",
        per_head=True,
        output_loss=True,
    ),
    "ias": Method("I&S-ViT (2023)", "percentile", "percentile", "shiftlog2", "uniform", reparam="mean"),
    "dopq": Method("DopQ-ViT (2024)", "percentile", "percentile", "tan", "uniform", reparam="median"),
    "ivit": Method(
        "I-ViT (ICCV 2023)", "minmax", "minmax", "int", "uniform", symmetric=True, integer_ops=True
    ),
}

# Points whose activation may be quantized per channel by the plain uniform methods.
_UNIFORM_ONLY = ("minmax", "percentile", "omse")


class QuantConfig(BaseModel):
    """Post-training quantization settings. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field("minmax", description=f"one of {', '.join(METHODS)}")
    w_bits: int = Field(8, description="weight bits (2-16)")
    a_bits: int = Field(8, description="activation bits (2-16)")
    softmax_bits: int | None = Field(None, description="post-softmax bits (default: a_bits; ivit: 16)")
    patch_embed_a_bits: int = Field(8, description="bits of the patch embedding's input (pixels)")
    head_a_bits: int | None = Field(None, description="bits of the classifier input (default: a_bits)")
    w_granularity: Literal["channel", "tensor"] = "channel"
    a_granularity: Literal["tensor", "channel"] = "tensor"
    percentile: float | None = Field(
        None, gt=0.5, le=1.0, description="fixed percentile (percentile methods)"
    )
    layer_bits: dict[str, int] = Field(default_factory=dict, description="{module pattern: bits}")
    calib_size: int = Field(128, gt=0, description="calibration images")
    calib_batch: int = Field(32, gt=0)
    seed: int = 0
    smoothquant: bool = Field(False, description="MPTQ-ViT SmoothQuant-with-bias before calibration")
    smooth_alpha: float = Field(0.5, ge=0.0, le=1.0)
    reconstruct: bool = Field(False, description="AdaRound-style block reconstruction after calibration")
    recon_iters: int = Field(200, gt=0)
    recon_batch: int = Field(32, gt=0)
    recon_lr: float = Field(1e-3, gt=0)
    recon_round_weight: float = Field(0.01, ge=0)
    mixed_precision: Literal["greedy", "lrp", "reverse", "uniform"] | None = Field(
        None, description="allocate per-layer bits under avg_bits (result stored in layer_bits)"
    )
    avg_bits: float | None = Field(
        None, description="parameter-weighted average weight bits (mixed precision)"
    )
    bit_choices: list[int] = Field(default_factory=lambda: [4, 8], description="bits a layer may get")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method, expected one of {', '.join(METHODS)}")
        return v

    @field_validator("w_bits", "a_bits", "softmax_bits", "patch_embed_a_bits", "head_a_bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        if v is not None and not MIN_BITS <= v <= MAX_BITS:
            raise ValueError(f"bits must be from {MIN_BITS} to {MAX_BITS}")
        return v

    @field_validator("bit_choices")
    @classmethod
    def _choices(cls, v: list[int]) -> list[int]:
        if not v or any(not MIN_BITS <= b <= MAX_BITS for b in v):
            raise ValueError(f"bit choices must be from {MIN_BITS} to {MAX_BITS}")
        return sorted(set(v))

    @field_validator("layer_bits")
    @classmethod
    def _layer_bits(cls, v: dict[str, int]) -> dict[str, int]:
        for pattern, bits in v.items():
            if not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(f"bits for '{pattern}' must be from {MIN_BITS} to {MAX_BITS}")
        return v

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def check(self) -> QuantConfig:
        """Cross-field checks (one line each)."""
        if self.a_granularity == "channel" and self.method not in _UNIFORM_ONLY:
            raise VitkitError(
                f"method '{self.method}' does not support a_granularity=channel: it quantizes activations "
                "per tensor (post-LayerNorm channel scales are reparameterized into the LayerNorm); use "
                f"{', '.join(_UNIFORM_ONLY)} for per-channel activations"
            )
        if self.method == "ivit" and (self.w_bits != 8 or self.a_bits != 8):
            raise VitkitError(
                f"method 'ivit' is integer-only 8-bit (I-ViT); got w_bits={self.w_bits}, a_bits={self.a_bits}"
            )
        if (self.mixed_precision is None) != (self.avg_bits is None):
            raise VitkitError("mixed precision needs both mixed_precision (greedy|lrp|uniform) and avg_bits")
        if self.avg_bits is not None and not min(self.bit_choices) <= self.avg_bits <= max(self.bit_choices):
            raise VitkitError(
                f"avg_bits={self.avg_bits} must lie within the bit choices {self.bit_choices} (set bit_choices)"
            )
        if self.smoothquant and self.spec.reparam:
            raise VitkitError(
                f"smoothquant and method '{self.method}' both rewrite the post-LayerNorm scales; choose one"
            )
        return self

    def softmax_bits_resolved(self) -> int:
        if self.softmax_bits is not None:
            return self.softmax_bits
        return 16 if self.spec.integer_ops else self.a_bits


def make_config(config: QuantConfig | dict[str, Any] | None = None, **overrides: Any) -> QuantConfig:
    """A validated config from a QuantConfig, a dict and/or keyword overrides (None values ignored)."""
    if isinstance(config, QuantConfig):
        data = config.model_dump()
    else:
        data = dict(config or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = parse_config(QuantConfig, data, "quantization config")
    return cfg.check()


def point_bits(cfg: QuantConfig, name: str, role: str) -> dict[str, int]:
    """Weight and activation bits of the point ``name`` (role decides the defaults)."""
    a = {
        "patch_embed": cfg.patch_embed_a_bits,
        "softmax": cfg.softmax_bits_resolved(),
        "head": cfg.head_a_bits or cfg.a_bits,
    }.get(role, cfg.a_bits)
    w = cfg.w_bits
    for pattern, bits in cfg.layer_bits.items():
        if fnmatch.fnmatchcase(name, pattern):
            w = a = check_bits(bits, f"layer_bits['{pattern}']")
    out = {"a": a}
    if role in ("patch_embed", "qkv", "proj", "fc1", "fc2", "head", "linear", "conv"):
        out["w"] = w
    return out

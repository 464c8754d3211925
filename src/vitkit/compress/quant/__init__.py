"""Post-training quantization of ViTs (simulated quantizers, calibration, mixed precision,
integer-only ops, and real INT8 deployment). Entry point: :func:`quantize`."""

from vitkit.compress.quant.config import METHODS, QuantConfig, make_config
from vitkit.compress.quant.layers import QuantConv2d, QuantLinear, QuantMatMul, QuantSoftmax
from vitkit.compress.quant.points import QuantPoint, find_points, quantizers
from vitkit.compress.quant.quantizers import (
    AdaLogQuantizer,
    Log2Quantizer,
    LogSqrt2Quantizer,
    Quantizer,
    ShiftLog2Quantizer,
    TanQuantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
)
from vitkit.compress.quant.transform import apply_quantization, quantize, replay_quantization

__all__ = [
    "METHODS",
    "AdaLogQuantizer",
    "Log2Quantizer",
    "LogSqrt2Quantizer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "QuantPoint",
    "QuantSoftmax",
    "Quantizer",
    "ShiftLog2Quantizer",
    "TanQuantizer",
    "TwinUniformQuantizer",
    "UniformQuantizer",
    "apply_quantization",
    "find_points",
    "make_config",
    "quantize",
    "quantizers",
    "replay_quantization",
]

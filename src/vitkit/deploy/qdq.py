"""Real INT8 execution of a quantized model: ONNX with QuantizeLinear/DequantizeLinear (QDQ) pairs at
the calibrated points, run by onnxruntime (which fuses QDQ around MatMul/Gemm/Conv into integer
kernels).

What changes: nothing in the model; during export each 8-bit :class:`UniformQuantizer` emits
``torch.fake_quantize_per_{tensor,channel}_affine`` with its own calibrated scale and zero point,
which the exporter writes as a QDQ pair. Only 8-bit uniform quantizers have an INT8 form in
onnxruntime; a model with any other quantizer (log2, twin, AdaLog, SULQ, TanQ, integer-only ops, or
uniform at other bit-widths) is refused with the name of the first such quantizer, and stays
simulated. The ONNX graph's accuracy is measured against the simulated model by the caller.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from vitkit.compress.quant.quantizers import Quantizer, UniformQuantizer, int8_blockers
from vitkit.errors import VitkitError

QDQ_FILE = "model_int8.onnx"  # vitkit quantize --deploy onnx: static W8A8 QDQ graph in the run


@contextlib.contextmanager
def qdq_export(model: nn.Module):
    """While inside, 8-bit uniform quantizers run as torch fake-quantize ops (exported as QDQ)."""
    qs = [q for q in model.modules() if isinstance(q, UniformQuantizer)]
    for q in qs:
        q.export_qdq = True
    try:
        yield
    finally:
        for q in qs:
            q.export_qdq = False


def export_int8_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int],
    check_images: torch.Tensor | None = None,
):
    """Export a quantized model as an INT8 QDQ ONNX graph (see module docstring)."""
    from vitkit.deploy.onnx import export_onnx

    if not any(isinstance(m, Quantizer) for m in model.modules()):
        raise VitkitError(
            "the model is not quantized: run vitkit.quantize first (method minmax/percentile/omse, 8 bits)"
        )
    blockers = int8_blockers(model)
    if blockers:
        raise VitkitError(
            f"onnxruntime cannot run quantizer {blockers[0]} in INT8 (and {len(blockers) - 1} more): only 8-bit "
            "uniform quantizers export as QDQ; keep this model simulated or quantize with minmax/percentile/omse at 8 bits"
        )
    with qdq_export(model):
        return export_onnx(model, path, input_shape, check_images=check_images, bound=float("inf"))

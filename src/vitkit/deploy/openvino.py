"""OpenVINO as a deploy back end: vitkit's ONNX graphs (fp32 export, token-reduced graphs, the static
INT8 QDQ graph of ``vitkit quantize --deploy onnx`` with vitkit's own calibrated scales) compiled for
the CPU by the OpenVINO runtime.

OpenVINO reads ONNX directly (``Core.read_model``); a QDQ graph's QuantizeLinear/DequantizeLinear
pairs become OpenVINO FakeQuantize operations, which its CPU plugin fuses into INT8 kernels (VNNI /
AMX where the CPU has them) — so the INT8 graph runs on vitkit's scales, with no NNCF calibration.
``precision="f32"`` pins the inference precision: on a CPU with AMX or AVX512-BF16 OpenVINO's default
hint is bf16, which would make "OpenVINO fp32" silently bf16 (the bench records what was asked).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from vitkit.deploy.onnx import check_external_data
from vitkit.errors import VitkitError

PRECISIONS = ("f32", "bf16")


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoModel:
    """An ONNX file compiled by OpenVINO for the CPU, taking and returning torch tensors."""

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        precision: str = "f32",
        hint: str = "LATENCY",
        fresh_requests: bool = False,
    ):
        try:
            import openvino as ov
        except ImportError as e:
            raise VitkitError("OpenVINO is not installed: pip install openvino") from e
        if precision not in PRECISIONS:
            raise VitkitError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
        if not Path(path).is_file():
            raise VitkitError(f"ONNX file '{path}' does not exist")
        check_external_data(path)
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO's refusals (unsupported op, broken graph): one line
            raise VitkitError(f"OpenVINO cannot compile '{path}': {str(e).splitlines()[0][:200]}") from None
        self.request = self.compiled.create_infer_request()
        # an infer request keeps its working memory between calls (like onnxruntime's arena): a fresh
        # request per call makes each call allocate it again, so peak memory can see it
        self.fresh_requests = fresh_requests
        self.path, self.threads, self.precision = Path(path), threads, precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        request = self.compiled.create_infer_request() if self.fresh_requests else self.request
        out = request.infer({0: arr})
        return torch.from_numpy(np.array(out[self.compiled.output(0)]))

    def eval(self) -> OpenVinoModel:  # benchmark helpers treat it like a module
        return self

    def executed_precisions(self) -> dict[str, int]:
        """How many executed layers ran in each precision (``u8``/``i8`` means real INT8 kernels)."""
        counts: dict[str, int] = {}
        for node in self.compiled.get_runtime_model().get_ordered_ops():
            rt = node.get_rt_info()
            if "runtimePrecision" in rt:
                value = rt["runtimePrecision"]
                p = value.astype(str) if hasattr(value, "astype") else str(value)
                counts[p] = counts.get(p, 0) + 1
        return counts


def openvino_parity(model: torch.nn.Module, onnx_path: str | os.PathLike, images: torch.Tensor) -> float:
    """Max |output difference| between PyTorch (fp32) and OpenVINO (f32) on ``images``."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(images).float()
    finally:
        model.train(was)
    return float((ref - OpenVinoModel(onnx_path)(images)).abs().max())

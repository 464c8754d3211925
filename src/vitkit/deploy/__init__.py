"""Deployment: ONNX export (onnx.py, export.py), benchmarks (bench.py, benchmark.py), the HTML report."""

from vitkit.deploy.onnx import ExportResult, OnnxModel, export_onnx, parity
from vitkit.deploy.timing import BenchConfig, BenchResult, compare, count_flops, timm_baseline

__all__ = [
    "BenchConfig",
    "BenchResult",
    "ExportResult",
    "OnnxModel",
    "compare",
    "count_flops",
    "export_onnx",
    "parity",
    "timm_baseline",
]

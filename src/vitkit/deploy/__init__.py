"""Deployment: benchmarking (and, in later issues, ONNX export and INT8 runtimes)."""

from vitkit.deploy.bench import BenchConfig, BenchResult, compare, count_flops, timm_baseline
from vitkit.deploy.onnx import ExportResult, OnnxModel, export_onnx, parity

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

"""Deployment: benchmarking (and, in later issues, ONNX export and INT8 runtimes)."""

from vitkit.deploy.bench import BenchConfig, BenchResult, compare, count_flops, timm_baseline

__all__ = ["BenchConfig", "BenchResult", "compare", "count_flops", "timm_baseline"]

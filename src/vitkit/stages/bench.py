"""Benchmark a run directory in every runtime it can be deployed with, next to plain timm.

For one run, in one process and interleaved round by round (``vitkit.deploy.timing.compare``):
plain ``timm.create_model`` of the run's base architecture (the baseline, fp32 eager; with bf16 also
under bf16 autocast, "timm bf16 eager"), the run in PyTorch eager fp32, optionally eager bf16
(autocast) and ``torch.compile``, and onnxruntime on
``RUN/model.onnx`` and ``RUN/model.int8.onnx`` when ``vitkit export`` wrote them (and the static
INT8 QDQ graph ``RUN/model_int8.onnx`` of ``vitkit quantize --deploy onnx``), and OpenVINO on
``model.onnx`` (fp32) and the QDQ graph (INT8 kernels on vitkit's scales) when it is installed.

Peak memory: :func:`vitkit.deploy.runtimes.peak_memory_mb` (how, and why that way, is written there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.deploy.export import INT8_NAME, ONNX_NAME, prepare_for_export
from vitkit.deploy.onnx import OnnxModel
from vitkit.deploy.openvino import OpenVinoModel, openvino_available
from vitkit.deploy.qdq import QDQ_FILE as QDQ_NAME
from vitkit.deploy.runtimes import Autocast, Runtime, for_memory, peak_memory_mb
from vitkit.deploy.timing import BenchConfig, compare, count_flops, resolve_threads, timm_baseline
from vitkit.errors import VitkitError
from vitkit.io import atomic_path
from vitkit.models import model_input_size
from vitkit.runs import Run

BENCH_JSON = "bench.json"
BENCH_PNG = "bench.png"
BASELINE = "timm fp32 eager"
BF16_BASELINE = "timm bf16 eager"  # with bf16: the same plain timm model under bf16 autocast
QDQ_LABEL = "onnxruntime int8 qdq"  # vitkit quantize --deploy onnx: static W8A8, real INT8 kernels


def runtime_variants(
    model: nn.Module, run_dir: Path, *, bf16: bool, compile: bool, onnx: bool, threads: int
) -> dict[str, nn.Module]:
    variants: dict[str, nn.Module] = {"vitkit fp32 eager": model}
    if bf16:
        variants["vitkit bf16 eager"] = Autocast(model)
    if compile:
        variants["vitkit fp32 compile"] = Runtime(torch.compile(prepare_for_export(model)))
    if onnx:
        files = ((ONNX_NAME, "onnxruntime fp32"), (INT8_NAME, "onnxruntime int8"), (QDQ_NAME, QDQ_LABEL))
        for name, label in files:
            if (run_dir / name).is_file():
                variants[label] = Runtime(OnnxModel(run_dir / name, threads=threads))
        if (
            openvino_available()
        ):  # the same graphs compiled by OpenVINO (fp32 pinned; INT8 on vitkit's scales)
            for name, label in ((ONNX_NAME, "openvino fp32"), (QDQ_NAME, "openvino int8 qdq")):
                if (run_dir / name).is_file():
                    variants[label] = Runtime(OpenVinoModel(run_dir / name, threads=threads))
    return variants


def bench_run(
    run_dir: str | os.PathLike,
    cfg: BenchConfig,
    *,
    baseline: bool = True,
    bf16: bool = False,
    compile: bool = False,
    onnx: bool = True,
    memory: bool = True,
) -> dict[str, Any]:
    """Benchmark one run (see the module docstring). Returns the JSON-able document."""
    run = Run.open(run_dir)
    model = run.model()
    run_dir = run.path
    shape = model_input_size(model)
    cfg = resolve_threads(cfg, [model])  # before the onnxruntime sessions, which take the count too
    models = runtime_variants(model, run_dir, bf16=bf16, compile=compile, onnx=onnx, threads=cfg.threads)
    if baseline:
        models[BASELINE] = timm_baseline(model)
        if bf16:
            models[BF16_BASELINE] = Autocast(models[BASELINE])
    res = compare(models, shape, cfg, measure_flops=False)
    example = torch.zeros(1, *shape)
    flops = count_flops(model, example)
    params = sum(p.numel() for p in model.parameters())
    for name, r in res.items():
        if name in (BASELINE, BF16_BASELINE):
            r.flops = count_flops(models[BASELINE], example)
            r.parameters = sum(p.numel() for p in models[BASELINE].parameters())
        else:
            r.flops, r.parameters = flops, params
    mem: dict[str, float | None] = {}
    if memory:
        xb = torch.zeros(cfg.throughput_batch, *shape)
        for name, m in models.items():
            mem[name] = peak_memory_mb(for_memory(m), xb)
    base, base16 = res.get(BASELINE), res.get(BF16_BASELINE)
    results = {}
    for name, r in res.items():
        d = r.to_dict()
        d["peak_memory_mb"] = mem.get(name)
        if base is not None:
            d["throughput_vs_timm"] = r.throughput / base.throughput
            d["latency_vs_timm"] = base.latency_ms_p50 / r.latency_ms_p50  # > 1: faster
        if base16 is not None:
            d["throughput_vs_timm_bf16"] = r.throughput / base16.throughput
            d["latency_vs_timm_bf16"] = base16.latency_ms_p50 / r.latency_ms_p50
        results[name] = d
    first = res["vitkit fp32 eager"]
    return {
        "run": str(run_dir),
        "input_shape": list(shape),
        "config": dict(cfg.__dict__),
        "torch_threads": torch.get_num_threads(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "baseline": BASELINE if base is not None else None,
        "results": results,
        "throughput_ratio_vs_timm": first.throughput / base.throughput if base is not None else None,
    }


def plot_bench(doc: dict[str, Any], path: str | os.PathLike) -> None:
    """Throughput (with the min–max spread of rounds) and batch-1 latency of every runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["results"])
    rs = [doc["results"][n] for n in names]
    thr = [r["throughput"] for r in rs]
    err = [
        [r["throughput"] - r["throughput_spread"][0] for r in rs],
        [r["throughput_spread"][1] - r["throughput"] for r in rs],
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.8))
    axes[0].barh(names, thr, xerr=err, color="tab:blue")
    axes[0].set_xlabel(f"images/s at batch {doc['config']['throughput_batch']} (min–max of rounds)")
    axes[1].barh(names, [r["latency_ms_p50"] for r in rs], color="tab:orange")
    axes[1].set_xlabel("latency at batch 1, p50 (ms)")
    axes[1].set_yticks([])
    fig.suptitle(f"{doc['run']} · {doc['config']['threads']} threads", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def check_bench_options(repeats: int, batch: int, threads: int | None, precision: str) -> None:
    if repeats < 1 or batch < 1 or (threads is not None and threads < 1):
        raise VitkitError("--repeats, --batch and --threads must be positive")
    if precision not in ("fp32", "bf16", "both"):
        raise VitkitError(f"--precision must be fp32, bf16 or both, got '{precision}'")

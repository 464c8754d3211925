"""Latency and throughput of a model, always next to a baseline measured in the same process.

Method: fixed thread count (given, or chosen once from the largest model's size and the free cores:
``vitkit.threads``); warm-up calls first; then ``repeats`` rounds in which the model and its
baseline are timed alternately (so drift on a shared machine hits both alike). Latency is per call
at batch 1 (p50/p90 over all timed calls); throughput is images per second at the large batch, one
value per round. Reported: medians, the spread (min–max over rounds) and the ratio of medians.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vitkit.models.flops import count_flops
from vitkit.progress import report
from vitkit.train.evaluate import autocast_context


@dataclass
class BenchConfig:
    threads: int | None = None  # None: chosen by vitkit.threads (OMP_NUM_THREADS, model size, free cores)
    repeats: int = 5
    warmup: int = 3
    latency_batch: int = 1
    latency_calls: int = 20  # timed batch-1 calls per round
    throughput_batch: int = 64
    precision: str = "fp32"


@dataclass
class BenchResult:
    name: str
    parameters: int
    flops: int  # forward FLOPs per image (multiply-add = 2)
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_spread: tuple[float, float]  # min and max of the per-round medians
    throughput: float  # img/s, median of rounds
    throughput_spread: tuple[float, float]
    throughput_rounds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_threads(cfg: BenchConfig, models: list[nn.Module], quiet: bool = False) -> BenchConfig:
    """``cfg`` with its thread count fixed (and applied): the given one, or the choice for the largest
    model; one count for all models, so that they are compared under the same conditions."""
    from vitkit.threads import set_threads_for

    largest = max(models, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    choice = set_threads_for(largest, cfg.threads, quiet=quiet)
    return dataclasses.replace(cfg, threads=choice.threads)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def compare(
    models: dict[str, nn.Module],
    input_shape: tuple[int, int, int],
    cfg: BenchConfig | None = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    measure_flops: bool = True,
) -> dict[str, BenchResult]:
    """Time every model on the same inputs, interleaved round by round. ``forward`` defaults to
    ``model(x)`` under no_grad and the configured precision. ``measure_flops=False`` leaves FLOPs at 0
    (for wrapped runtimes such as onnxruntime or compiled graphs that the flop counter cannot see)."""
    cfg = resolve_threads(cfg or BenchConfig(), list(models.values()), quiet=True)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(cfg.latency_batch, *input_shape, generator=g)
    xb = torch.randn(cfg.throughput_batch, *input_shape, generator=g)

    def run(m: nn.Module, x: torch.Tensor) -> None:
        with torch.no_grad(), autocast_context("cpu", cfg.precision):
            forward(m, x) if forward else m(x)

    for m in models.values():
        m.eval()
        for _ in range(cfg.warmup):
            run(m, x1)
        run(m, xb)

    report("timing rounds", 0, cfg.repeats)
    lat: dict[str, list[float]] = {k: [] for k in models}
    lat_round: dict[str, list[float]] = {k: [] for k in models}
    thr: dict[str, list[float]] = {k: [] for k in models}
    for r in range(cfg.repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            m = models[name]
            calls = []
            for _ in range(cfg.latency_calls):
                t = time.perf_counter()
                run(m, x1)
                calls.append((time.perf_counter() - t) * 1e3)
            lat[name] += calls
            lat_round[name].append(statistics.median(calls))
            t = time.perf_counter()
            run(m, xb)
            thr[name].append(cfg.throughput_batch / (time.perf_counter() - t))
        report("timing rounds", r + 1, cfg.repeats)

    out = {}
    for name, m in models.items():
        out[name] = BenchResult(
            name=name,
            parameters=sum(p.numel() for p in m.parameters()),
            flops=count_flops(m, x1) if measure_flops else 0,
            latency_ms_p50=_percentile(lat[name], 0.5),
            latency_ms_p90=_percentile(lat[name], 0.9),
            latency_ms_spread=(min(lat_round[name]), max(lat_round[name])),
            throughput=statistics.median(thr[name]),
            throughput_spread=(min(thr[name]), max(thr[name])),
            throughput_rounds=thr[name],
        )
    return out


def timm_baseline(model: nn.Module) -> nn.Module:
    """Plain ``timm.create_model`` of the run's base architecture, with the run's weights where they fit
    (a transformed model keeps its own structure; the baseline is the untransformed one)."""
    import timm

    from vitkit.models import get_manifest

    manifest = get_manifest(model)
    if manifest is None:
        raise ValueError("the model has no manifest: cannot tell which timm model is its baseline")
    try:
        base = timm.create_model(manifest.name, **manifest.kwargs)
    except TypeError as e:  # a CNN run recorded img_size (vitkit.create_model drops it for CNNs too)
        if "img_size" not in str(e) or "img_size" not in manifest.kwargs:
            raise
        base = timm.create_model(
            manifest.name, **{k: v for k, v in manifest.kwargs.items() if k != "img_size"}
        )
    state = model.state_dict()
    own = base.state_dict()
    base.load_state_dict(
        {k: state[k] for k in own if k in state and state[k].shape == own[k].shape}, strict=False
    )
    return base.eval()

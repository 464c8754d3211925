"""Runtimes as modules (bf16 autocast, an onnxruntime session, a compiled function) and their peak memory.

Peak memory (``peak_memory_mb``) is the rise of the process's resident set during one steady-state
throughput-batch call: the call's activations and workspace, not the weights nor one-time costs.
Measured in this process, after a warm-up call, by returning freed heap memory to the OS
(glibc ``malloc_trim``) and resetting the kernel's peak-RSS counter (``/proc/self/clear_refs``),
then reading ``VmHWM`` after the call (a sampling thread where the counter cannot be reset);
onnxruntime is measured in a fresh session without its memory arena. Why: the earlier measurement
(RSS sampled every ms around the call) read 0.0 MB, because the warm-up and timed calls had already
left that memory resident in the allocator's free lists (a 0.2 M-param ViT at batch 64: 36 MB on a
process's first call, 0.004 MB after three calls, 5.8 MB after ``malloc_trim``). A fresh process
per runtime would also see the memory, but costs a torch import per runtime (seconds each, some
25 runtimes in ``vitkit demo``) and counts one-time costs in with the call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.deploy.onnx import OnnxModel


class Autocast(nn.Module):
    """The model under CPU bf16 autocast."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x)


class Runtime(nn.Module):
    """Any callable (an onnxruntime session, a compiled function) as a module, for ``compare``."""

    def __init__(self, fn: Any):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc only; elsewhere nothing happens)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # not glibc: no malloc_trim
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sampled_peak_kb(call: Any) -> int:
    peak = [_status_kb("VmRSS")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kb("VmRSS"))
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        call()
    finally:
        stop.set()
        t.join()
    return max(peak[0], _status_kb("VmRSS"))


def peak_memory_mb(model: nn.Module, x: torch.Tensor) -> float | None:
    """Peak rise of resident memory during one steady-state call on ``x`` (MB; see the module
    docstring); None where /proc is missing."""
    import gc

    if not Path("/proc/self/status").exists():
        return None

    def call() -> None:
        with torch.no_grad():
            model(x)

    call()  # one-time costs (kernel selection, thread pools, lazy buffers) are not the call's memory
    gc.collect()
    _malloc_trim()
    base = _status_kb("VmRSS")
    if _reset_peak_rss():
        call()
        peak = _status_kb("VmHWM")
    else:
        peak = _sampled_peak_kb(call)
    return max(0, peak - base) * 1024 / 1e6


def for_memory(model: nn.Module) -> nn.Module:
    """The model to measure: an onnxruntime session is replaced by a fresh one without its arena,
    an OpenVINO model by one that makes a new infer request per call (an arena or a kept request
    holds the memory of earlier calls, so a call would add nothing)."""
    from vitkit.deploy.openvino import OpenVinoModel

    fn = getattr(model, "fn", None)
    if isinstance(model, Runtime) and isinstance(fn, OnnxModel):
        return Runtime(OnnxModel(fn.path, threads=fn.threads, optimization=fn.optimization, arena=False))
    if isinstance(model, Runtime) and isinstance(fn, OpenVinoModel):
        return Runtime(
            OpenVinoModel(fn.path, threads=fn.threads, precision=fn.precision, fresh_requests=True)
        )
    return model

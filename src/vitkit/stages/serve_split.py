"""``vitkit serve-split``: an ED-ViT split (``vitkit split``) served for real, one process per
sub-model, through torch.distributed (gloo; started by torchrun).

Per request, process 0 (the aggregator, which also hosts sub-model 0) broadcasts the images, every
process runs its sub-model, ``dist.gather`` brings the pre-logits features to process 0, which
concatenates them and applies the fusion head. Measured: batch-1 latency (p50/p90 over requests)
and throughput at a larger batch for the split and, in the same run, for the unsplit source model on
process 0 alone (the others waiting at a barrier); each process's peak resident memory (VmHWM); and
the fused top-1 on the source's validation images, which must equal ``split.json``'s. Writes
``SPLIT/serve.json``.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vitkit.errors import VitkitError
from vitkit.io import write_json


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _timed(fn, x: torch.Tensor, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def serve_split_worker(
    path: str | os.PathLike, *, requests: int = 50, batch: int = 64, threads: int = 1
) -> dict[str, Any] | None:
    """Run inside a torchrun launch with as many processes as the split has sub-models."""
    import vitkit
    from vitkit.models.inference import eval_transform
    from vitkit.runs import Run
    from vitkit.stages.split import fuse, load_split

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    report, subs, fusion = load_split(path)
    if world != report["devices"]:
        raise VitkitError(
            f"serve-split: {report['devices']} sub-models need {report['devices']} processes, got {world}"
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mine = subs[rank]
    del subs[rank + 1 :], subs[:rank]  # each process keeps only its sub-model
    src = Run.open(report["source"])
    tf = eval_transform(mine)
    val = src.data("val")
    shape = (batch, *tf.images(val.images[:1]).shape[1:])

    def split_forward(x: torch.Tensor) -> torch.Tensor | None:
        dist.broadcast(x, 0)
        with torch.no_grad():
            f = mine.forward_head(mine.forward_features(x), pre_logits=True).contiguous()
        parts = [torch.empty_like(f) for _ in range(world)] if rank == 0 else None
        dist.gather(f, parts, dst=0)
        return fuse(fusion, torch.cat(parts, 1)) if rank == 0 else None

    # accuracy, served: every validation image through the distributed path
    correct = 0
    for i in range(0, len(val), batch):
        x = tf.images(val.images[i : i + batch])
        n = len(x)
        if n < batch:  # fixed shapes for broadcast/gather: pad the last batch
            x = torch.cat([x, x[:1].expand(batch - n, *x.shape[1:])])
        logits = split_forward(x.contiguous())
        if rank == 0:
            correct += int((logits[:n].argmax(1) == val.targets[i : i + n]).sum())
    # latency at batch 1 and throughput at `batch`, split vs unsplit (same process 0, interleaved)
    one = torch.zeros(1, *shape[1:])
    big = torch.zeros(*shape)
    source = vitkit.load(report["source"]).eval() if rank == 0 else None
    res: dict[str, list[float]] = {
        "split_latency": [],
        "split_batch": [],
        "unsplit_latency": [],
        "unsplit_batch": [],
    }
    for _ in range(3):  # warm-up
        split_forward(one)
    for _ in range(max(1, requests // 10)):
        res["split_latency"] += _timed(split_forward, one, 10)
        res["split_batch"] += _timed(split_forward, big, 1)
        dist.barrier()
        if rank == 0:
            with torch.no_grad():
                res["unsplit_latency"] += _timed(source, one, 10)
                res["unsplit_batch"] += _timed(source, big, 1)
        dist.barrier()
    peaks = [None] * world
    dist.all_gather_object(peaks, _peak_rss_mb())
    out = None
    if rank == 0:
        ms = {k: [1e3 * t for t in v] for k, v in res.items()}
        out = {
            "processes": world,
            "threads_per_process": threads,
            "served_top1": correct / len(val),
            "split_top1": report["fused_top1"],
            "latency_ms": {
                "split_p50": statistics.median(ms["split_latency"]),
                "split_p90": statistics.quantiles(ms["split_latency"], n=10)[-1],
                "unsplit_p50": statistics.median(ms["unsplit_latency"]),
                "unsplit_p90": statistics.quantiles(ms["unsplit_latency"], n=10)[-1],
            },
            "throughput": {
                "batch": batch,
                "split": batch / statistics.median(res["split_batch"]),
                "unsplit": batch / statistics.median(res["unsplit_batch"]),
            },
            "peak_rss_mb": peaks,
            "load": os.getloadavg()[0],
        }
        write_json(Path(path) / "serve.json", out)
    dist.barrier()
    return out


def serve_split(
    path: str | os.PathLike,
    *,
    procs: int | None = None,
    requests: int = 50,
    batch: int = 64,
    threads: int = 1,
) -> dict[str, Any]:
    """Serve the split: inside torchrun, as its worker; otherwise start torchrun (the launcher of
    torch.distributed) with one process per sub-model and read back ``serve.json``."""
    import json
    import subprocess
    import sys

    from vitkit.stages.split import SPLIT_JSON

    p = Path(path)
    if not (p / SPLIT_JSON).is_file():
        raise VitkitError(f"'{p}' is not a vitkit split (no {SPLIT_JSON}; make one with vitkit split)")
    if "WORLD_SIZE" in os.environ:
        return serve_split_worker(p, requests=requests, batch=batch, threads=threads) or {}
    devices = json.loads((p / SPLIT_JSON).read_text())["devices"]
    if procs is not None and procs != devices:
        raise VitkitError(f"--procs {procs}: the split has {devices} sub-models (one process each)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices),
           "-m", "vitkit", "serve-split", str(p), "--requests", str(requests), "--batch", str(batch),
           "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        raise VitkitError(
            lines[0].removeprefix("error: ") if lines else f"serve-split failed: {proc.stderr[-400:]}"
        )
    return json.loads((p / "serve.json").read_text())

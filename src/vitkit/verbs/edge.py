"""Edge verbs: ``vitkit split`` (ED-ViT: class-wise pruned sub-models + a fusion head) and
``vitkit serve-split`` (the split served with one process per sub-model, torch.distributed)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb


class SplitOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    run: Path = argument(help="a classification run to split")
    output: Path = option(..., help="new folder: sub-K runs, fusion.safetensors, split.json")
    devices: int = option(..., help="devices = sub-models (each takes a subset of similar classes)")
    memory_mb: float | None = option(None, help="per-device budget for fp32 weights: prunes until it fits")
    prune: float | None = option(
        None, help="fraction of heads and MLP channels pruned (instead of --memory-mb)"
    )
    epochs: int = option(2, help="fine-tuning epochs of each sub-model")
    fusion_epochs: int = option(20, help="epochs of the fusion head (sub-models frozen)")
    lr: float | None = option(None, help="fine-tuning learning rate [default: the run's]")
    seed: int = option(0, help="seed")
    force: bool = option(False, "--force", help="replace a non-empty output folder")


def split_cmd(o: SplitOptions) -> None:
    """ED-ViT: split a classifier into class-wise pruned sub-models, one per device, and a fusion head."""
    check_output(o.output, "dir", force=o.force)
    from vitkit.stages.split import split_run

    r = split_run(
        o.run, o.output, devices=o.devices, memory_mb=o.memory_mb, prune=o.prune, epochs=o.epochs,
        fusion_epochs=o.fusion_epochs, lr=o.lr, seed=o.seed, force=o.force, quiet=False,
    )  # fmt: skip
    console.print(
        f"split into {o.devices}: fused top-1 {r['fused_top1']:.4f} (source {r['source_top1']:.4f}, argmax over "
        f"the sub-models' logits {r['concat_argmax_top1']:.4f}); largest sub-model {r['max_sub_weight_mb']:.2f} MB "
        f"of weights (source {r['source_weight_mb']:.2f} MB)"
    )
    console.print(f"written: {o.output}/ (sub-*, fusion.safetensors, split.json)")


class ServeSplitOptions(VerbOptions):
    split: Path = argument(help="a folder written by vitkit split")
    procs: int | None = option(None, help="processes (= sub-models; started with torchrun)")
    requests: int = option(50, help="timed batch-1 requests")
    batch: int = option(64, help="batch size of the throughput measurement")
    threads: int = option(1, help="torch threads per process")


def serve_split_cmd(o: ServeSplitOptions) -> None:
    """Serve an ED-ViT split with one process per sub-model (torch.distributed): latency, memory, accuracy."""
    from vitkit.stages.serve_split import serve_split

    r = serve_split(o.split, procs=o.procs, requests=o.requests, batch=o.batch, threads=o.threads)
    if not r:
        return  # a worker process
    lat = r["latency_ms"]
    console.print(
        f"served by {r['processes']} processes: top-1 {r['served_top1']:.4f}; batch-1 latency p50 "
        f"{lat['split_p50']:.2f} ms (unsplit {lat['unsplit_p50']:.2f} ms); peak memory per process "
        f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} MB"
    )
    console.print(f"written: {o.split}/serve.json")


register_verb(Verb("split", SplitOptions, split_cmd, panel="Deploy"))
register_verb(Verb("serve-split", ServeSplitOptions, serve_split_cmd, panel="Deploy"))

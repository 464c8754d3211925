"""``vitkit reduce-tokens``, ``vitkit prune``, ``vitkit reparam``, ``vitkit compare``: faster ViTs.

Each transforming verb reads a run and writes a new one (``-o``); the logic is in
:mod:`vitkit.stages.compress`. ``compare`` writes a table and a plot, not a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator

from vitkit.io import check_output
from vitkit.progress import console
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb

PANEL = "Compress"
_FORCE = "replace a non-empty output directory"
_LR = "fine-tuning lr [default: the run's lr / 4]"


def _summary(path: Path, m: dict, keys: tuple[str, ...]) -> None:
    parts = []
    for k in keys:
        v = m.get(k)
        if v is None:
            continue
        parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
    console.print("  ".join(parts))
    console.print(f"written: {path}/ (model.json, model.safetensors, metrics.json, stage.yaml)")


class ReduceTokensOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    run: Path = argument(help="run directory to reduce")
    output: Path | None = option(None, help="new run directory")
    method: Literal["evit", "tome", "pvc"] = option(
        "evit",
        help="evit (keep the attended tokens) | tome (merge similar tokens) | pvc (finer patches, window merges)",
    )
    keep: float = option(0.7, help="EViT: fraction of tokens kept at each reducing block, in (0, 1]")
    at: str | None = option(
        None,
        help="EViT: 0-based reducing blocks, e.g. 3,6,9 [default: quarters of the depth]; PVC: blocks after "
        "which 2x2 windows merge",
    )
    patch: int | None = option(None, help="PVC: run the patch embedding at this patch size (RPE)")
    merge: Literal["avg", "mlp"] = option("avg", help="PVC: window mean | content-aware MLP weights")
    r: str = option("8", help="ToMe: token pairs merged per block (one int, or one per block: 4,4,2,2)")
    prop_attn: bool = option(True, "--prop-attn/--no-prop-attn", help="ToMe: proportional attention")
    finetune: int = option(0, help="fine-tune this many epochs after the transform (0: off the shelf)")
    lr: float | None = option(None, help=_LR)
    keep_warmup: float | None = option(
        None, help="EViT: epochs of the keep-rate cosine from 1 [default: half]"
    )
    force: bool = option(False, "--force", help=_FORCE)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: object) -> object:
        if v not in ("evit", "tome", "pvc"):  # the one-line text the command has always given
            raise ValueError("expected evit, tome or pvc")
        return v


def reduce_tokens(o: ReduceTokensOptions) -> None:
    """Token reduction: EViT (top-k by class attention + fused token), ToMe (bipartite merging) or PVC (window merges)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir", force=o.force)
    from vitkit.compress._blocks import parse_int_list
    from vitkit.errors import VitkitError
    from vitkit.stages.compress import reduce_tokens_run

    if o.output is None:
        raise VitkitError("say where to write the reduced run with -o/--output")
    rs = parse_int_list(o.r, "--r")
    res = reduce_tokens_run(
        o.run, o.output, method=o.method, keep=o.keep, at=parse_int_list(o.at, "--at"),
        r=rs[0] if len(rs) == 1 else rs, prop_attn=o.prop_attn, finetune=o.finetune, lr=o.lr,
        keep_warmup=o.keep_warmup, patch=o.patch, merge=o.merge, force=o.force,
    )  # fmt: skip
    _summary(res.path, res.metrics, ("top1", "off_the_shelf_top1", "source_top1", "parameters"))


class PruneOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    run: Path = argument(help="run directory to prune")
    output: Path | None = option(None, help="new run directory")
    method: Literal["structured", "lpvit", "dimap"] = option(
        "structured", help="structured (smaller dense model) | lpvit (tile masks) | dimap (masks)"
    )
    heads: float = option(0.0, help="structured: fraction of attention heads removed per block")
    mlp: float = option(0.0, help="structured: fraction of MLP hidden channels removed per block")
    importance: Literal["magnitude", "taylor"] = option(
        "magnitude", help="structured/lpvit: magnitude | taylor"
    )
    flops: float = option(0.5, help="lpvit: fraction of the model's FLOPs kept")
    block: int = option(16, help="lpvit: tile size")
    power: bool = option(True, "--power/--no-power", help="lpvit: hardware-aware power term")
    sparsity: float = option(0.5, help="dimap: fraction of block-linear weights removed")
    finetune: int = option(0, help="fine-tune this many epochs after pruning")
    lr: float | None = option(None, help=_LR)
    force: bool = option(False, "--force", help=_FORCE)


def prune(o: PruneOptions) -> None:
    """Prune a run: heads + MLP channels (real speed), LPViT tiles or DIMAP weights (FLOPs only on CPU)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir", force=o.force)
    from vitkit.errors import VitkitError
    from vitkit.stages.compress import prune_run

    if o.output is None:
        raise VitkitError("say where to write the pruned run with -o/--output")
    res = prune_run(
        o.run, o.output, method=o.method, heads=o.heads, mlp=o.mlp, importance=o.importance,
        flops=o.flops, block=o.block, power=o.power, sparsity=o.sparsity, finetune=o.finetune, lr=o.lr,
        force=o.force,
    )  # fmt: skip
    _summary(
        res.path, res.metrics,
        ("top1", "off_the_shelf_top1", "source_top1", "parameters", "parameters_before", "sparsity", "flops_fraction"),
    )  # fmt: skip


class ReparamOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    run: Path = argument(help="run trained with --repavit")
    output: Path | None = option(None, help="new run directory")
    force: bool = option(False, "--force", help=_FORCE)


def reparam(o: ReparamOptions) -> None:
    """RePaViT: fold the channel-idle FFN (and its BatchNorms) into its smaller inference form."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir", force=o.force)
    from vitkit.errors import VitkitError
    from vitkit.stages.compress import reparam_run

    if o.output is None:
        raise VitkitError("say where to write the reparameterized run with -o/--output")
    res = reparam_run(o.run, o.output, force=o.force)
    _summary(res.path, res.metrics, ("top1", "source_top1", "parameters", "parameters_before"))


class CompareOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    runs: list[Path] = argument(help="run directories; the first is the baseline")
    output: Path | None = option(None, help="write compare.json and compare.png here")
    threads: int | None = option(
        None, help="torch threads, fixed and recorded [default: chosen from the model size and free cores]"
    )
    repeats: int = option(5, help="timed rounds, interleaved")
    batch: int = option(64, help="throughput batch size")

    @field_validator("threads", "repeats", "batch")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("--repeats, --batch and --threads must be positive")
        return v


def compare(o: CompareOptions) -> None:
    """Accuracy and speed of several runs side by side (same process, interleaved), with a plot."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "dir")
    from rich.table import Table

    from vitkit.stages.compare import compare_runs

    rows = compare_runs(
        [str(r) for r in o.runs], o.output, threads=o.threads, repeats=o.repeats, batch=o.batch
    )
    import torch

    t = Table(
        title=f"compare ({torch.get_num_threads()} threads, fp32, median of {o.repeats} interleaved rounds)"
    )
    for col in ("run", "transforms", "top-1", "Δ top-1", "params", "MFLOPs", "lat ms", "img/s", "speed-up"):
        t.add_column(col, justify="left" if col in ("run", "transforms") else "right")
    for row in rows:
        flops = f"{row['flops'] / 1e6:.1f}"
        if "sparse_flops" in row:
            flops += f" ({row['sparse_flops'] / 1e6:.1f} sparse)"
        t.add_row(
            row["name"], ",".join(row["transforms"]), f"{100 * row['top1']:.2f}", f"{100 * row['top1_delta']:+.2f}",
            f"{row['parameters']:,}", flops, f"{row['latency_ms_p50']:.2f}", f"{row['throughput']:.0f}",
            f"{row['throughput_ratio']:.2f}x",
        )  # fmt: skip
    console.print(t)
    if o.output is not None:
        console.print(f"written: {o.output}/compare.json, {o.output}/compare.png")


register_verb(
    Verb("reduce-tokens", ReduceTokensOptions, reduce_tokens, panel=PANEL, input="run", produces=True)
)
register_verb(Verb("prune", PruneOptions, prune, panel=PANEL, input="run", produces=True))
register_verb(Verb("reparam", ReparamOptions, reparam, panel=PANEL, input="run", produces=True))
# compare writes a table and a plot to -o, not a run.
register_verb(Verb("compare", CompareOptions, compare, panel=PANEL, input="runs"))

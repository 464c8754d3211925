"""``vitkit reduce-tokens``, ``vitkit prune``, ``vitkit reparam``, ``vitkit compare``: faster ViTs.

Each transforming verb reads a run and writes a new one (``-o``); the logic is in
:mod:`vitkit.stages.compress`.
"""

from pathlib import Path

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.io import check_output
from vitkit.progress import console

PANEL = "Compress"


def _summary(path: Path, m: dict, keys: tuple[str, ...]) -> None:
    parts = []
    for k in keys:
        v = m.get(k)
        if v is None:
            continue
        parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
    console.print("  ".join(parts))
    console.print(f"written: {path}/ (model.json, model.safetensors, metrics.json, stage.yaml)")


@app.command("reduce-tokens", rich_help_panel=PANEL)
def reduce_tokens(
    run: Path = Arg(..., help="run directory to reduce"),
    output: Path | None = Opt(None, "-o", "--output", help="new run directory"),
    method: str = Opt("evit", help="evit (keep the attended tokens) | tome (merge similar tokens)"),
    keep: float = Opt(0.7, help="EViT: fraction of tokens kept at each reducing block, in (0, 1]"),
    at: str | None = Opt(
        None, help="EViT: 0-based reducing blocks, e.g. 3,6,9 [default: quarters of the depth]"
    ),
    r: str = Opt("8", help="ToMe: token pairs merged per block (one int, or one per block: 4,4,2,2)"),
    prop_attn: bool = Opt(True, "--prop-attn/--no-prop-attn", help="ToMe: proportional attention"),
    finetune: int = Opt(0, help="fine-tune this many epochs after the transform (0: off the shelf)"),
    lr: float | None = Opt(None, help="fine-tuning lr [default: the run's lr / 4]"),
    keep_warmup: float | None = Opt(None, help="EViT: epochs of the keep-rate cosine from 1 [default: half]"),
    force: bool = Opt(False, "--force", help="replace a non-empty output directory"),
) -> None:
    """Token reduction: EViT (top-k by class attention + fused token) or ToMe (bipartite merging)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir", force=force)
    from vitkit.compress._blocks import parse_int_list
    from vitkit.errors import VitkitError
    from vitkit.stages.compress import reduce_tokens_run

    if output is None:
        raise VitkitError("say where to write the reduced run with -o/--output")
    rs = parse_int_list(r, "--r")
    res = reduce_tokens_run(
        run, output, method=method, keep=keep, at=parse_int_list(at, "--at"),
        r=rs[0] if len(rs) == 1 else rs, prop_attn=prop_attn, finetune=finetune, lr=lr,
        keep_warmup=keep_warmup, force=force,
    )  # fmt: skip
    _summary(res.path, res.metrics, ("top1", "off_the_shelf_top1", "source_top1", "parameters"))


@app.command(rich_help_panel=PANEL)
def prune(
    run: Path = Arg(..., help="run directory to prune"),
    output: Path | None = Opt(None, "-o", "--output", help="new run directory"),
    method: str = Opt(
        "structured", help="structured (smaller dense model) | lpvit (tile masks) | dimap (masks)"
    ),
    heads: float = Opt(0.0, help="structured: fraction of attention heads removed per block"),
    mlp: float = Opt(0.0, help="structured: fraction of MLP hidden channels removed per block"),
    importance: str = Opt("magnitude", help="structured/lpvit: magnitude | taylor"),
    flops: float = Opt(0.5, help="lpvit: fraction of the model's FLOPs kept"),
    block: int = Opt(16, help="lpvit: tile size"),
    power: bool = Opt(True, "--power/--no-power", help="lpvit: hardware-aware power term"),
    sparsity: float = Opt(0.5, help="dimap: fraction of block-linear weights removed"),
    finetune: int = Opt(0, help="fine-tune this many epochs after pruning"),
    lr: float | None = Opt(None, help="fine-tuning lr [default: the run's lr / 4]"),
    force: bool = Opt(False, "--force", help="replace a non-empty output directory"),
) -> None:
    """Prune a run: heads + MLP channels (real speed), LPViT tiles or DIMAP weights (FLOPs only on CPU)."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir", force=force)
    from vitkit.errors import VitkitError
    from vitkit.stages.compress import prune_run

    if output is None:
        raise VitkitError("say where to write the pruned run with -o/--output")
    res = prune_run(
        run, output, method=method, heads=heads, mlp=mlp, importance=importance, flops=flops, block=block,
        power=power, sparsity=sparsity, finetune=finetune, lr=lr, force=force,
    )  # fmt: skip
    _summary(
        res.path, res.metrics,
        ("top1", "off_the_shelf_top1", "source_top1", "parameters", "parameters_before", "sparsity", "flops_fraction"),
    )  # fmt: skip


@app.command(rich_help_panel=PANEL)
def reparam(
    run: Path = Arg(..., help="run trained with --repavit"),
    output: Path | None = Opt(None, "-o", "--output", help="new run directory"),
    force: bool = Opt(False, "--force", help="replace a non-empty output directory"),
) -> None:
    """RePaViT: fold the channel-idle FFN (and its BatchNorms) into its smaller inference form."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir", force=force)
    from vitkit.errors import VitkitError
    from vitkit.stages.compress import reparam_run

    if output is None:
        raise VitkitError("say where to write the reparameterized run with -o/--output")
    res = reparam_run(run, output, force=force)
    _summary(res.path, res.metrics, ("top1", "source_top1", "parameters", "parameters_before"))


@app.command(rich_help_panel=PANEL)
def compare(
    runs: list[Path] = Arg(..., help="run directories; the first is the baseline"),
    output: Path | None = Opt(None, "-o", "--output", help="write compare.json and compare.png here"),
    threads: int | None = Opt(
        None, help="torch threads, fixed and recorded [default: chosen from the model size and free cores]"
    ),
    repeats: int = Opt(5, help="timed rounds, interleaved"),
    batch: int = Opt(64, help="throughput batch size"),
) -> None:
    """Accuracy and speed of several runs side by side (same process, interleaved), with a plot."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "dir")
    from rich.table import Table

    from vitkit.errors import VitkitError
    from vitkit.stages.compare import compare_runs

    if repeats < 1 or batch < 1 or (threads is not None and threads < 1):
        raise VitkitError("--repeats, --batch and --threads must be positive")
    rows = compare_runs([str(r) for r in runs], output, threads=threads, repeats=repeats, batch=batch)
    import torch

    t = Table(
        title=f"compare ({torch.get_num_threads()} threads, fp32, median of {repeats} interleaved rounds)"
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
    if output is not None:
        console.print(f"written: {output}/compare.json, {output}/compare.png")

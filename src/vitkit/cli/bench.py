"""``vitkit bench``: latency and throughput of runs next to plain timm, in the same process."""

from pathlib import Path

import typer

from vitkit.cli import app
from vitkit.progress import console

Opt = typer.Option


@app.command(rich_help_panel="Deploy")
def bench(
    runs: list[Path] = typer.Argument(..., help="run directories"),
    threads: int = Opt(2, help="torch threads (fixed and recorded)"),
    repeats: int = Opt(5, help="timed rounds (≥ 5 recommended)"),
    batch: int = Opt(64, help="throughput batch size"),
    precision: str = Opt("fp32", help="fp32 | bf16"),
    baseline: bool = Opt(
        True, "--baseline/--no-baseline", help="also time plain timm of the same architecture"
    ),
    output: Path | None = Opt(None, "-o", "--output", help="write the results as JSON here"),
) -> None:
    """Latency (batch 1, p50/p90) and throughput (batch 64), parameters and FLOPs, vs plain timm."""
    from rich.table import Table

    from vitkit.deploy import BenchConfig, compare, timm_baseline
    from vitkit.errors import VitkitError
    from vitkit.io import write_json
    from vitkit.models import model_input_size
    from vitkit.runs import load

    if repeats < 1 or batch < 1 or threads < 1:
        raise VitkitError("--repeats, --batch and --threads must be positive")
    if precision not in ("fp32", "bf16"):
        raise VitkitError(f"--precision must be fp32 or bf16, got '{precision}'")
    cfg = BenchConfig(threads=threads, repeats=repeats, throughput_batch=batch, precision=precision)
    report = {"config": cfg.__dict__, "runs": {}}
    table = Table(title=f"bench ({threads} threads, {precision}, median of {repeats} rounds)")
    for col in (
        "model",
        "params",
        "MFLOPs/img",
        "lat p50 ms",
        "lat p90 ms",
        f"img/s @{batch}",
        "spread",
        "vs timm",
    ):
        table.add_column(col, justify="right" if col != "model" else "left")
    for run in runs:
        model = load(run)
        models = {str(run): model}
        if baseline:
            models["timm " + model.vitkit_manifest.name] = timm_baseline(model)
        res = compare(models, model_input_size(model), cfg)
        names = list(res)
        ratio = res[names[0]].throughput / res[names[1]].throughput if baseline else None
        report["runs"][str(run)] = {
            "results": {k: v.to_dict() for k, v in res.items()},
            "throughput_ratio_vs_timm": ratio,
        }
        for k, r in res.items():
            table.add_row(
                k,
                f"{r.parameters:,}",
                f"{r.flops / 1e6:.1f}",
                f"{r.latency_ms_p50:.2f}",
                f"{r.latency_ms_p90:.2f}",
                f"{r.throughput:.0f}",
                f"{r.throughput_spread[0]:.0f}–{r.throughput_spread[1]:.0f}",
                f"{ratio:.3f}x" if (ratio is not None and k == names[0]) else "",
            )
    console.print(table)
    if output is not None:
        write_json(output, report)
        console.print(f"written: {output}")

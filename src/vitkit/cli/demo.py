"""``vitkit demo``."""

import time
from pathlib import Path

import typer

from vitkit.cli import app
from vitkit.demo import QUICK_EPOCHS
from vitkit.progress import console

Opt = typer.Option


@app.command(rich_help_panel="Start here")
def demo(
    output: Path = Opt(Path("runs/demo"), "-o", "--output", help="pipeline work directory"),
    quick: bool = Opt(False, "--quick", help=f"train {QUICK_EPOCHS} epochs instead of 60, small bench batch"),
    force: bool = Opt(False, "--force", help="rerun every stage, even unchanged completed ones"),
) -> None:
    """The lifecycle on the embedded digits: train a 0.2M-parameter ViT, evaluate, export ONNX + INT8, bench, report."""
    from rich.table import Table

    from vitkit.demo import run_demo_pipeline

    console.print(
        "[bold]vitkit demo[/]: vitkit_micro_p4_16 on the embedded digits (scikit-learn, 1,797 real 8x8 "
        f"images) as a pipeline; stages in {output}/pipeline.yaml"
    )
    t0 = time.perf_counter()
    rows = run_demo_pipeline(
        output, quick=quick, force=force, echo=lambda m: console.print(f"[bold]{m}[/]", highlight=False)
    )
    t = Table(title="vitkit demo: each deployed form vs PyTorch fp32 eager (1 thread)")
    for col in ("stage", "val top-1", "size MB", "lat b=1 ms", "img/s", "speedup b=1", "speedup img/s"):
        t.add_column(col, justify="left" if col == "stage" else "right")

    def f(v, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    for r in rows:
        t.add_row(r["stage"], f(r["accuracy"], ".2%"), f(r["size_mb"], ".2f"), f(r["latency_ms"], ".2f"),
                  f(r["throughput"], ".0f"), f(r["speedup_latency"], ".2f"), f(r["speedup_throughput"], ".2f"))  # fmt: skip
    console.print(t)
    console.print(
        f"report: {output}/report.html · total {time.perf_counter() - t0:.0f} s · "
        "accuracy of the ONNX forms is measured on the same held-out images"
    )

"""``vitkit demo``."""

import time
from pathlib import Path

from vitkit.cli import app
from vitkit.cli.options import Opt
from vitkit.io import check_output
from vitkit.progress import console


@app.command(rich_help_panel="Start here")
def demo(
    output: Path = Opt(Path("runs/demo"), "-o", "--output", help="pipeline work directory"),
    quick: bool = Opt(
        False,
        "--quick",
        help="fewer epochs (student 25 instead of 60; vitkit.demo.QUICK), a tiny CNN teacher, small bench batch",
    ),
    force: bool = Opt(False, "--force", help="rerun every stage, even unchanged completed ones"),
) -> None:
    """The lifecycle on the embedded digits: CNN teacher, distilled ViT, export + INT8, token reduction, W8A8/W4A4, attack, bench, report."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(output, "dir")
    from rich.table import Table

    from vitkit.demo import best_deployed_graph, run_demo_pipeline

    console.print(
        "[bold]vitkit demo[/]: a CNN teacher and a DeiT-distilled vitkit_micro_distilled_p4_16 on the embedded digits (scikit-learn, 1,797 real 8x8 "
        f"images) as a pipeline; stages in {output}/pipeline.yaml"
    )
    t0 = time.perf_counter()
    rows = run_demo_pipeline(
        output, quick=quick, force=force, echo=lambda m: console.print(f"[bold]{m}[/]", highlight=False)
    )
    t = Table(
        title="vitkit demo: every stage vs the FP32 baseline (timm fp32 eager, same bench process, 1 thread)"
    )
    for col in ("stage", "val top-1", "size MB", "lat b=1 ms", "img/s", "speedup b=1", "speedup img/s",
                "img/s vs bf16"):  # fmt: skip
        t.add_column(col, justify="left" if col == "stage" else "right")

    def f(v, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    for r in rows:
        t.add_row(r["stage"], f(r["accuracy"], ".2%"), f(r["size_mb"], ".2f"), f(r["latency_ms"], ".2f"),
                  f(r["throughput"], ".0f"), f(r["speedup_latency"], ".2f"), f(r["speedup_throughput"], ".2f"),
                  f(r["speedup_throughput_bf16"], ".2f"))  # fmt: skip
    console.print(t)
    best = best_deployed_graph(rows)
    if best is not None:
        ratio = "—" if best["vs_bf16"] is None else f"{best['vs_bf16']:.2f}x"
        console.print(
            f"best deployed graph ({best['stage']}): top-1 {-best['drop_pt']:+.2f} pt vs the distilled FP32 ViT "
            f"({best['accuracy']:.2%}); throughput {best['vs_fp32']:.2f}x timm fp32 eager, {ratio} timm bf16 "
            "eager (bf16 is slower than fp32 on CPUs without AMX / AVX512-BF16)",
            highlight=False,
        )
    console.print(
        f"report: {output}/report.html · total {time.perf_counter() - t0:.0f} s · "
        "accuracies on the same 359 held-out images (attack: PGD on a fixed subset); w4a4 is simulated "
        "(its size: parameters × 4 bits)"
    )

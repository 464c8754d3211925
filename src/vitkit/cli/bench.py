"""``vitkit bench``: latency and throughput of runs in every runtime, next to plain timm, in one process."""

import contextlib
from pathlib import Path

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.io import check_output
from vitkit.progress import console, current_stage


@app.command(rich_help_panel="Deploy")
def bench(
    runs: list[Path] = Arg(..., help="run directories"),
    threads: int | None = Opt(
        None,
        help="torch and onnxruntime threads, recorded [default: chosen from the model size and free cores]",
    ),
    repeats: int = Opt(5, help="timed rounds (≥ 5 recommended)"),
    batch: int = Opt(64, help="throughput batch size"),
    latency_calls: int = Opt(20, help="timed batch-1 calls per round"),
    precision: str = Opt("fp32", help="fp32 | bf16 | both: bf16 adds an eager bf16-autocast row"),
    compile: bool = Opt(False, "--compile/--no-compile", help="also time torch.compile (slow to warm up)"),
    onnx: bool = Opt(
        True, "--onnx/--no-onnx", help="also time RUN/model.onnx and model.int8.onnx if present"
    ),
    memory: bool = Opt(True, "--memory/--no-memory", help="peak resident memory of one batch call"),
    baseline: bool = Opt(
        True, "--baseline/--no-baseline", help="also time plain timm of the same architecture"
    ),
    save: bool = Opt(True, "--save/--no-save", help="write RUN/bench.json and RUN/bench.png"),
    output: Path | None = Opt(None, "-o", "--output", help="write all runs' results as JSON here"),
) -> None:
    """Latency (batch 1, p50/p90), throughput, memory, parameters and FLOPs in each runtime, vs plain timm."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if output is not None:
        check_output(output, "file")
    from rich.table import Table

    from vitkit.deploy import BenchConfig
    from vitkit.deploy.benchmark import BENCH_JSON, BENCH_PNG, bench_run, check_bench_options, plot_bench
    from vitkit.io import write_json

    check_bench_options(repeats, batch, threads, precision)
    cfg = BenchConfig(threads=threads, repeats=repeats, throughput_batch=batch, latency_calls=latency_calls)
    report = {"config": cfg.__dict__, "runs": {}}
    table = Table()
    used: list[int] = []  # thread counts of the runs (one each; chosen per run unless --threads)
    for col in ("run", "runtime", "params", "MFLOPs/img", "lat p50 ms", "lat p90 ms",
                f"img/s @{batch}", "spread", "vs timm", "peak MB"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("run", "runtime") else "right")
    stage = current_stage()
    for i, run in enumerate(runs):
        # In a pipeline stage: each run is one part of the stage's time left.
        with stage.part(i, len(runs)) if stage else contextlib.nullcontext():
            doc = bench_run(
                run,
                cfg,
                baseline=baseline,
                bf16=precision in ("bf16", "both"),
                compile=compile,
                onnx=onnx,
                memory=memory,
            )
        report["runs"][str(run)] = doc
        used += [] if doc["config"]["threads"] in used else [doc["config"]["threads"]]
        if save:
            write_json(Path(run) / BENCH_JSON, doc)
            plot_bench(doc, Path(run) / BENCH_PNG)
        for k, r in doc["results"].items():
            ratio = r.get("throughput_vs_timm")
            mem = r.get("peak_memory_mb")
            table.add_row(
                Path(run).name,
                k,
                f"{r['parameters']:,}",
                f"{r['flops'] / 1e6:.1f}",
                f"{r['latency_ms_p50']:.2f}",
                f"{r['latency_ms_p90']:.2f}",
                f"{r['throughput']:.0f}",
                f"{r['throughput_spread'][0]:.0f}–{r['throughput_spread'][1]:.0f}",
                f"{ratio:.2f}x" if ratio is not None else "",
                f"{mem:.1f}" if mem is not None else "",
            )
    table.title = (f"bench ({'/'.join(map(str, used))} threads, median of {repeats} rounds, "
                   "spread = min–max)")  # fmt: skip
    console.print(table)
    if save:  # the real paths, one line per run (was a literal "RUN/bench.json")
        for run in runs:
            console.print(
                f"written: {Path(run) / BENCH_JSON}, {Path(run) / BENCH_PNG}", highlight=False, soft_wrap=True
            )
    if output is not None:
        write_json(output, report)
        console.print(f"written: {output}")

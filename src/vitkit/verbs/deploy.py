"""``vitkit export``, ``vitkit bench``, ``vitkit report`` and ``vitkit crop``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar, Literal

from vitkit.io import check_output
from vitkit.progress import console, current_stage
from vitkit.verbs import Verb, VerbOptions, argument, option, register_verb


class ExportOptions(VerbOptions):
    run: Path = argument(help="run directory")
    format: Literal["onnx"] = option("onnx", help="onnx")
    exporter: Literal["torchscript", "dynamo"] | None = option(
        None,
        help="torchscript (faster graphs here) | dynamo [default: the model's choice: torchscript; dynamo "
        "for models with FFTs (Hyena N-D), which the torchscript exporter cannot write]",
    )
    opt_level: Literal["none", "basic", "extended", "all"] = option(
        "all", help="onnxruntime graph optimization: none | basic | extended | all"
    )
    threads: int | None = option(None, help="torch and onnxruntime threads")
    int8: Literal["dynamic"] | None = option(
        None, help="dynamic: also write model.int8.onnx (onnxruntime dynamic INT8)"
    )
    images: int = option(256, help="real validation images for the parity check")
    bound: float | None = option(
        None,
        help="max |logit difference| vs PyTorch allowed [default: 1e-4; a quantized run: its INT8 rule's bound]",
    )
    data: str | None = option(None, help="parity data [default: the run's validation split]")


def export(o: ExportOptions) -> None:
    """Export a run to ONNX (dynamic batch) with a parity check on its own validation images."""
    from vitkit.stages.export import export_run

    res = export_run(
        o.run,
        fmt=o.format,
        exporter=o.exporter,
        opt_level=o.opt_level,
        threads=o.threads,
        int8=o.int8,
        images=o.images,
        bound=o.bound,
        data=o.data,
    )
    d = res.doc
    console.print(
        f"written: {res.path} ({d['size_bytes'] / 1e6:.2f} MB, {d['exporter']}, opset {d['opset']}); "
        f"max |logit diff| vs PyTorch {d['max_abs_logit_diff']:.2e} on {d['parity_images']} images "
        f"(bound {d['bound']:.0e}); top-1 {d['top1_onnx']:.2%}"
        + (f", top-1 agreement {d['top1_agreement']:.2%} (INT8 graph)" if "int8_ops" in d else "")
        if d["top1_onnx"] is not None
        else f"written: {res.path}; max |logit diff| {d['max_abs_logit_diff']:.2e}"
    )
    for e in d.get("exits", []):
        console.print(
            f"written: {o.run / e['file']} (exit after {e['blocks']} blocks, {e['head']} head, "
            f"{e['size_bytes'] / 1e6:.2f} MB); max |logit diff| {e['max_abs_logit_diff']:.2e}"
            + (f", top-1 {e['top1_onnx']:.2%}" if e["top1_onnx"] is not None else "")
        )
    if "int8" in d:
        q = d["int8"]
        console.print(
            f"written: {o.run / q['file']} ({q['size_bytes'] / 1e6:.2f} MB); max |logit diff| "
            f"{q['max_abs_logit_diff']:.2e}, top-1 agreement {q['top1_agreement']:.2%}"
            + (f", top-1 {q['top1']:.2%}" if q["top1"] is not None else "")
        )
    console.print(f"written: {o.run / 'export.json'}")


class ReportOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    runs: list[Path] = argument(help="run directories")
    output: Path = option(Path("report.html"), help="HTML file to write")


def report(o: ReportOptions) -> None:
    """One self-contained HTML page: lineage, curves, metrics, confusion matrix, Pareto plot, analyses."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(o.output, "file")
    from vitkit.stages.report import write_report

    for w in write_report(o.runs, o.output):
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    console.print(f"written: {o.output}")


class BenchOptions(VerbOptions):
    short: ClassVar[dict[str, str]] = {"output": "-o"}

    runs: list[Path] = argument(help="run directories")
    threads: int | None = option(
        None,
        help="torch and onnxruntime threads, recorded [default: chosen from the model size and free cores]",
    )
    repeats: int = option(5, help="timed rounds (≥ 5 recommended)")
    batch: int = option(64, help="throughput batch size")
    latency_calls: int = option(20, help="timed batch-1 calls per round")
    precision: Literal["fp32", "bf16", "both"] = option(
        "fp32", help="fp32 | bf16 | both: bf16 adds an eager bf16-autocast row"
    )
    compile: bool = option(False, "--compile/--no-compile", help="also time torch.compile (slow to warm up)")
    onnx: bool = option(True, help="also time RUN/model.onnx and model.int8.onnx if present")
    memory: bool = option(True, help="peak resident memory of one batch call")
    baseline: bool = option(True, help="also time plain timm of the same architecture")
    save: bool = option(True, help="write RUN/bench.json and RUN/bench.png")
    output: Path | None = option(None, help="write all runs' results as JSON here")


def bench(o: BenchOptions) -> None:
    """Latency (batch 1, p50/p90), throughput, memory, parameters and FLOPs in each runtime, vs plain timm."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    if o.output is not None:
        check_output(o.output, "file")
    from rich.table import Table

    from vitkit.deploy import BenchConfig
    from vitkit.io import write_json
    from vitkit.stages.bench import BENCH_JSON, BENCH_PNG, bench_run, check_bench_options, plot_bench

    check_bench_options(o.repeats, o.batch, o.threads, o.precision)
    cfg = BenchConfig(
        threads=o.threads, repeats=o.repeats, throughput_batch=o.batch, latency_calls=o.latency_calls
    )
    doc_all = {"config": cfg.__dict__, "runs": {}}
    table = Table()
    used: list[int] = []  # thread counts of the runs (one each; chosen per run unless --threads)
    for col in ("run", "runtime", "params", "MFLOPs/img", "lat p50 ms", "lat p90 ms",
                f"img/s @{o.batch}", "spread", "vs timm", "peak MB"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("run", "runtime") else "right")
    stage = current_stage()
    for i, run in enumerate(o.runs):
        # In a pipeline stage: each run is one part of the stage's time left.
        with stage.part(i, len(o.runs)) if stage else contextlib.nullcontext():
            doc = bench_run(
                run,
                cfg,
                baseline=o.baseline,
                bf16=o.precision in ("bf16", "both"),
                compile=o.compile,
                onnx=o.onnx,
                memory=o.memory,
            )
        doc_all["runs"][str(run)] = doc
        used += [] if doc["config"]["threads"] in used else [doc["config"]["threads"]]
        if o.save:
            write_json(run / BENCH_JSON, doc)
            plot_bench(doc, run / BENCH_PNG)
        for k, r in doc["results"].items():
            ratio = r.get("throughput_vs_timm")
            mem = r.get("peak_memory_mb")
            table.add_row(
                run.name,
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
    table.title = (f"bench ({'/'.join(map(str, used))} threads, median of {o.repeats} rounds, "
                   "spread = min–max)")  # fmt: skip
    console.print(table)
    if o.save:  # the real paths, one line per run (was a literal "RUN/bench.json")
        for run in o.runs:
            console.print(f"written: {run / BENCH_JSON}, {run / BENCH_PNG}", highlight=False, soft_wrap=True)
    if o.output is not None:
        write_json(o.output, doc_all)
        console.print(f"written: {o.output}")


register_verb(Verb("export", ExportOptions, export, panel="Deploy", input="run"))
register_verb(Verb("bench", BenchOptions, bench, panel="Deploy", input="runs"))
register_verb(Verb("report", ReportOptions, report, panel="Deploy", input="runs"))


class CropOptions(VerbOptions):
    run: Path = argument(help="detection run directory")
    output: Path = option(
        ..., "-o", "--output", help="the crops, an .npz file (x, y, classes, groups, scores, image_index)"
    )
    boxes: Literal["truth", "detected"] = option(
        "detected", help="truth: every true box (to train a classifier) | detected: the run's detections"
    )
    split: Literal["train", "val", "test"] = option("val", help="which split of the run's data to crop")
    data: str | None = option(None, help="crop this dataset's boxes instead (the whole of it)")
    min_score: float = option(0.3, help="detected: the lowest detection score cropped")
    size: int | None = option(None, help="crop side in pixels [default: the images' side]")
    margin: float = option(0.1, help="grow each box by this fraction of its side, each way")
    force: bool = option(False, "--force", help="overwrite an existing output file")


def crop(o: CropOptions) -> None:
    """Cut a detection run's boxes (true or detected) into an npz dataset for a classifier (detect -> crop -> classify)."""
    check_output(o.output, "file", force=o.force)
    from vitkit.stages.crop import crop_boxes

    s = crop_boxes(
        o.run, o.output, data=o.data, split=o.split, boxes=o.boxes, min_score=o.min_score, size=o.size,
        margin=o.margin, force=o.force,
    )  # fmt: skip
    extra = (
        f"; {s['matched']} detections matched a true box, {s['unmatched']} did not, {s['missed']} true boxes missed"
        if o.boxes == "detected"
        else ""
    )
    console.print(
        f"written: {o.output} ({s['crops']} crops of {s['size']} px from {s['images']} images, {s['groups']} groups{extra})"
    )


register_verb(Verb("crop", CropOptions, crop, panel="Deploy", input="run"))

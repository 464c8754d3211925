"""``vitkit export``, ``vitkit report`` and ``vitkit pipeline``."""

from pathlib import Path

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.io import check_output
from vitkit.progress import console


@app.command(rich_help_panel="Deploy")
def export(
    run: Path = Arg(..., help="run directory"),
    format: str = Opt("onnx", "--format", help="onnx"),
    exporter: str = Opt("torchscript", help="torchscript (faster graphs here) | dynamo"),
    opt_level: str = Opt("all", help="onnxruntime graph optimization: none | basic | extended | all"),
    threads: int | None = Opt(None, help="torch and onnxruntime threads"),
    int8: str | None = Opt(None, help="dynamic: also write model.int8.onnx (onnxruntime dynamic INT8)"),
    images: int = Opt(256, help="real validation images for the parity check"),
    bound: float | None = Opt(
        None,
        help="max |logit difference| vs PyTorch allowed [default: 1e-4; a quantized run: its INT8 rule's bound]",
    ),
    data: str | None = Opt(None, help="parity data [default: the run's validation split]"),
) -> None:
    """Export a run to ONNX (dynamic batch) with a parity check on its own validation images."""
    from vitkit.deploy.export import export_run

    res = export_run(
        run,
        fmt=format,
        exporter=exporter,
        opt_level=opt_level,
        threads=threads,
        int8=int8,
        images=images,
        bound=bound,
        data=data,
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
            f"written: {Path(run) / e['file']} (exit after {e['blocks']} blocks, {e['head']} head, "
            f"{e['size_bytes'] / 1e6:.2f} MB); max |logit diff| {e['max_abs_logit_diff']:.2e}"
            + (f", top-1 {e['top1_onnx']:.2%}" if e["top1_onnx"] is not None else "")
        )
    if "int8" in d:
        q = d["int8"]
        console.print(
            f"written: {Path(run) / q['file']} ({q['size_bytes'] / 1e6:.2f} MB); max |logit diff| "
            f"{q['max_abs_logit_diff']:.2e}, top-1 agreement {q['top1_agreement']:.2%}"
            + (f", top-1 {q['top1']:.2%}" if q["top1"] is not None else "")
        )
    console.print(f"written: {Path(run) / 'export.json'}")


@app.command(rich_help_panel="Deploy")
def report(
    runs: list[Path] = Arg(..., help="run directories"),
    output: Path = Opt(Path("report.html"), "-o", "--output", help="HTML file to write"),
) -> None:
    """One self-contained HTML page: lineage, curves, metrics, confusion matrix, Pareto plot, analyses."""
    # Before any loading or computing: a bad -o must not cost minutes of work first.
    check_output(output, "file")
    from vitkit.deploy.report import write_report

    for w in write_report(runs, output):
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    console.print(f"written: {output}")


@app.command(rich_help_panel="Deploy")
def pipeline(
    file: Path = Arg(..., help="pipeline YAML (see examples/*.yaml)"),
    force: bool = Opt(False, "--force", help="run every stage, even unchanged completed ones"),
    check: bool = Opt(False, "--check", help="validate the file and stop"),
) -> None:
    """Run a YAML list of stages (each a vitkit verb) in order; unchanged completed stages are skipped."""
    from vitkit.pipeline import load_pipeline, run_pipeline

    if check:
        pipe = load_pipeline(file)
        for s in pipe.stages:
            src = f" ← {', '.join(s.inputs)}" if s.inputs else ""
            out = f" → {pipe.workdir / s.name}" if s.produces else ""
            console.print(f"stage {s.index} {s.name}: vitkit {s.verb}{src}{out}")
        console.print(f"{file}: {len(pipe.stages)} stages, valid")
        return
    outcomes = run_pipeline(file, force=force, echo=lambda m: console.print(f"[bold]{m}[/]", highlight=False))
    ran = sum(o.status == "ran" for o in outcomes)
    console.print(f"pipeline {file}: {ran} stages ran, {len(outcomes) - ran} skipped (unchanged)")

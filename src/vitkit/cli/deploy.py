"""``vitkit pipeline``."""

from pathlib import Path

from vitkit.cli import app
from vitkit.cli.options import Arg, Opt
from vitkit.progress import console


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

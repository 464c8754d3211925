"""``vitkit demo``."""

from pathlib import Path

import typer

from vitkit.cli import app
from vitkit.progress import console

Opt = typer.Option


@app.command(rich_help_panel="Start here")
def demo(
    output: Path = Opt(Path("runs/demo"), "-o", "--output", help="run directory to write"),
    force: bool = Opt(False, "--force", help="replace an existing demo run"),
    epochs: int | None = Opt(None, help="override the recipe's 60 epochs"),
    quiet: bool = Opt(False, "--quiet", "-q"),
) -> None:
    """Train a 0.2M-parameter ViT from scratch on the embedded digits (~1 min on 2 cores) and evaluate it."""
    from rich.table import Table

    from vitkit.demo import run_demo

    overrides = {"epochs": epochs} if epochs else {}
    console.print(
        "[bold]vitkit demo[/]: training vitkit_micro_p4_16 on the embedded digits (scikit-learn, 1,797 real 8x8 images)"
    )
    s = run_demo(output, force=force, quiet=quiet, **overrides)
    t = Table(title="vitkit demo")
    t.add_column("stage")
    t.add_column("model")
    t.add_column("params", justify="right")
    t.add_column("val top-1", justify="right")
    t.add_column("balanced acc", justify="right")
    t.add_column("macro-F1", justify="right")
    t.add_column("ECE", justify="right")
    t.add_column("train s", justify="right")
    t.add_row(
        "train (from scratch)",
        s["model"],
        f"{s['parameters']:,}",
        f"{s['top1']:.2%}",
        f"{s['balanced_accuracy']:.2%}",
        f"{s['macro_f1']:.3f}",
        f"{s['ece']:.3f}",
        f"{s['train_seconds']:.0f}",
    )
    console.print(t)
    console.print(
        f"{s['val_images']} held-out images; run directory: {s['run']}  (total {s['total_seconds']:.0f} s)"
    )
    console.print(f"next: vitkit evaluate {s['run']}   ·   vitkit bench {s['run']}")

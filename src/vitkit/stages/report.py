"""``vitkit report``: read run directories and write the HTML report page (:mod:`vitkit.report.html`)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from vitkit.errors import VitkitError
from vitkit.io import check_output, read_json, write_text
from vitkit.report.html import RunData, render_report
from vitkit.runs import read_metrics, read_run
from vitkit.tasks import get_task


def collect(run_dir: str | os.PathLike) -> RunData:
    info = read_run(run_dir)
    p = info.path
    history = []
    if (p / "history.csv").is_file():
        with open(p / "history.csv", newline="") as f:
            history = list(csv.DictReader(f))
    analyses: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for kind in ("attack", "similarity", "attention", "tokens"):
        for j in sorted(p.glob(f"*/{kind}.json")):
            analyses.setdefault(kind, []).append((j, read_json(j)))
    try:
        task = get_task(info.task)
        quality_key, metric_keys, task_figures = task.quality_key, task.summary_keys, task.figures
    except VitkitError:  # a task this vitkit does not know: the generic table still shows
        quality_key, metric_keys, task_figures = "top1", (), ()
    figures = [(title, p / name) for title, name in task_figures if (p / name).is_file()]
    return RunData(
        path=p,
        label=p.name,
        model=info.manifest.name,
        transforms=[{"name": t.name, "config": dict(t.config)} for t in info.manifest.transforms],
        data=str(info.data.get("uri", "?")),
        metrics=read_metrics(p),
        history=history,
        export=read_json(p / "export.json") if (p / "export.json").is_file() else None,
        bench=read_json(p / "bench.json") if (p / "bench.json").is_file() else None,
        analyses=analyses,
        quality_key=quality_key,
        metric_keys=tuple(metric_keys),
        figures=figures,
        head=info.manifest.head,
    )


def build_report(runs: list[str | os.PathLike], title: str = "vitkit report") -> tuple[str, list[str]]:
    """The HTML text and the warnings (e.g. runs on different datasets) for these run directories."""
    return render_report([collect(r) for r in runs], title)


def write_report(runs: list[str | os.PathLike], output: str | os.PathLike) -> list[str]:
    check_output(output, "file")  # before the rendering, which takes a while for many runs
    text, warnings = build_report(runs)
    write_text(output, text)
    return warnings

"""``vitkit compare``: accuracy (each run's validation split) and speed (interleaved in one process) of
several runs side by side, as a table (compare.json) and a plot (compare.png)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vitkit.compress.prune import sparsity_report
from vitkit.compress.prune.masked import MaskedLinear
from vitkit.deploy.timing import BenchConfig, compare
from vitkit.errors import VitkitError
from vitkit.io import atomic_path, write_json
from vitkit.models import model_input_size
from vitkit.runs import Run
from vitkit.train import evaluate


def compare_runs(
    runs: list[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    repeats: int = 5,
    batch: int = 64,
) -> list[dict[str, Any]]:
    """Accuracy (each run's validation split) and speed (interleaved in one process) of several runs;
    the first run is the baseline of the ratios. Writes compare.json and compare.png to ``output``."""
    if len(runs) < 1:
        raise VitkitError("compare: give at least one run directory")
    models, rows = {}, []
    shape = None
    for r in runs:
        run = Run.open(r)
        model = run.model()
        s = model_input_size(model)
        if shape is not None and s != shape:
            raise VitkitError(
                f"compare: run '{r}' takes {s} inputs, '{runs[0]}' takes {shape}; compare runs of one input size"
            )
        shape = s
        data = run.eval_data(None, s[1])
        m = evaluate(model, data)
        name = Path(r).name if Path(r).name not in models else str(r)
        models[name] = model
        row = {
            "run": str(r),
            "name": name,
            "transforms": run.transforms or ["-"],
            "top1": m.get("top1", float("nan")),
        }
        if any(isinstance(x, MaskedLinear) for x in model.modules()):
            rep = sparsity_report(model, s)
            row["sparsity"], row["sparse_flops"] = rep["sparsity"], rep["sparse_flops"]
        rows.append(row)
    res = compare(models, shape, BenchConfig(threads=threads, repeats=repeats, throughput_batch=batch))
    base = rows[0]
    b = res[base["name"]]
    for row in rows:
        r = res[row["name"]]
        row.update(
            {
                "parameters": r.parameters,
                "flops": r.flops,
                "latency_ms_p50": r.latency_ms_p50,
                "latency_ms_spread": list(r.latency_ms_spread),
                "throughput": r.throughput,
                "throughput_spread": list(r.throughput_spread),
                "throughput_ratio": r.throughput / b.throughput,
                "latency_ratio": r.latency_ms_p50 / b.latency_ms_p50,
                "top1_delta": row["top1"] - base["top1"],
            }
        )
    if output is not None:
        out = Path(output)
        write_json(out / "compare.json", {"runs": rows, "threads": torch.get_num_threads(), "repeats": repeats, "batch": batch,
                                          "torch_threads": torch.get_num_threads()})  # fmt: skip
        plot_comparison(rows, out / "compare.png")
    return rows


def plot_comparison(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Accuracy vs throughput (batch) and vs latency (batch 1), one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "throughput", "throughput (img/s, batch)"),
        (axes[1], "latency_ms_p50", "latency p50 (ms, batch 1)"),
    ):
        for row in rows:
            ax.scatter(row[key], 100 * row["top1"], s=30)
            ax.annotate(
                row["name"],
                (row[key], 100 * row["top1"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy vs throughput")
    axes[1].set_title("accuracy vs latency")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

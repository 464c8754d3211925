"""``vitkit evaluate``: a run's task metrics on its validation split or on other data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitkit.errors import VitkitError
from vitkit.models import model_input_size
from vitkit.runs import Run
from vitkit.stages.common import run_task, slug
from vitkit.tasks import get_task
from vitkit.threads import set_threads_for


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | None = None,
    *,
    output: str | os.PathLike | None = None,
    batch_size: int = 256,
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = False,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """Evaluate a run with its task's metrics; writes ``metrics.json`` and the task's plots
    (``confusion_matrix.png``, ``recall_at_k.png``, ...) into ``output`` (default
    ``RUN/eval-<data>/``). Returns (metrics, output directory)."""
    run = Run.open(run_dir)
    info = run.info
    if info.task == "none":
        raise VitkitError(
            f"run '{run_dir}' is a self-supervised encoder without a classifier: evaluate it with --probe linear|knn"
        )
    task = run_task(info)  # before loading anything: a run of an unknown task fails at once
    model = run.model(device)
    set_threads_for(model)  # OMP_NUM_THREADS, else by model size and free cores (printed once)
    img = model_input_size(model)[1]
    dataset = run.eval_data(data, img, strict=strict, same_classes=task.name != "retrieval")
    if task.name == "classification" and dataset.multilabel:
        task = get_task("multilabel")  # a legacy run that said "multiclass" for multi-hot data
    train_counts = run.metrics.get("train_class_counts")
    metrics = task.evaluate(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        class_counts=train_counts,
        many_threshold=many_threshold,
        few_threshold=few_threshold,
    )
    out = Path(output) if output else info.path / f"eval-{slug(data or dataset.name)}"
    out.mkdir(parents=True, exist_ok=True)
    task.write_outputs({**metrics, "run": str(info.path)}, dataset, out)
    return metrics, out


def zero_shot_run(
    run_dir: str | os.PathLike,
    data: str,
    *,
    output: str | os.PathLike | None = None,
    batch_size: int = 256,
    strict: bool = False,
    device: str = "cpu",
) -> tuple[dict[str, Any], Path]:
    """Zero-shot classification of an image-text run on labelled data (``vitkit evaluate RUN
    --zero-shot URI``): class-name prompts, top-1 and per-class accuracy; writes ``metrics.json`` and
    ``zero_shot.png`` into ``output`` (default ``RUN/zeroshot-<data>/``)."""
    from vitkit.data import load_eval_data
    from vitkit.tasks.imagetext import write_zero_shot_plot, zero_shot_metrics

    run = Run.open(run_dir)
    if run_task(run.info).name != "image-text":
        raise VitkitError(
            f"--zero-shot: run '{run_dir}' is a {run.info.task} run; zero-shot needs an image-text run "
            "(vitkit train --task image-text)"
        )
    model = run.model(device)
    set_threads_for(model)
    dataset = load_eval_data(data, img_size=model_input_size(model)[1], strict=strict)
    metrics = zero_shot_metrics(model, dataset, batch_size=batch_size)
    metrics["run"] = str(run.path)
    out = Path(output) if output else run.path / f"zeroshot-{slug(data)}"
    out.mkdir(parents=True, exist_ok=True)
    from vitkit.io import write_json

    write_zero_shot_plot(metrics, out / "zero_shot.png")
    write_json(out / "metrics.json", metrics)
    return metrics, out

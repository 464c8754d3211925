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

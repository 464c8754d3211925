"""Evaluation of a model on a dataset with its task's metrics (``vitkit.evaluate``).

The metric functions live with the tasks (:mod:`vitkit.tasks.metrics`), batched prediction with the
models (:mod:`vitkit.models.inference`); both are importable from here too.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkit.data import BatchTransform, ImageDataset
from vitkit.models.inference import autocast_context, eval_transform, predict
from vitkit.report.plots import save_confusion_matrix
from vitkit.tasks import Task, task_for_data
from vitkit.tasks.metrics import classification_metrics, expected_calibration_error, multilabel_metrics

__all__ = [
    "autocast_context",
    "classification_metrics",
    "eval_transform",
    "evaluate",
    "expected_calibration_error",
    "multilabel_metrics",
    "predict",
    "save_confusion_matrix",
]


def evaluate(
    model: nn.Module,
    data: ImageDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    class_counts: list[int] | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    transform: BatchTransform | None = None,
    logits: torch.Tensor | None = None,
    task: Task | None = None,
) -> dict:
    """All metrics of ``task`` for ``model`` on ``data`` (pass ``logits`` to score precomputed
    outputs). Without a task: classification, or multi-label classification for multi-hot targets."""
    if task is None:
        task = task_for_data(data)
    return task.evaluate(
        model,
        data,
        batch_size=batch_size,
        device=device,
        precision=precision,
        transform=transform,
        outputs=logits,
        class_counts=class_counts,
        many_threshold=many_threshold,
        few_threshold=few_threshold,
    )

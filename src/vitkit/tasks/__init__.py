"""Tasks: what a kind of problem tells the loop, the evaluator and the exporter (see base.py and
docs/tasks.md). Built in: classification, multilabel, retrieval."""

from vitkit.tasks.base import (
    ExportSignature,
    NoOptions,
    Task,
    TensorSpec,
    get_task,
    known_tasks,
    parse_task_spec,
    register_task,
    resolve_task,
    task_for_data,
)

__all__ = [
    "ExportSignature",
    "NoOptions",
    "Task",
    "TensorSpec",
    "get_task",
    "known_tasks",
    "parse_task_spec",
    "register_task",
    "resolve_task",
    "task_for_data",
]

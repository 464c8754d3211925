"""The Python API: one function per stage, the same functions the CLI verbs call.

    from vitkit.api import train_model, quantize_run, export_run
    run = train_model(TrainConfig(data="digits", epochs=30), "runs/a")
    quantize_run("runs/a", "runs/a-w8a8", method="repq")
    export_run("runs/a-w8a8")

Every name loads lazily from its stage module (``vitkit.stages.*``), so importing this module is
cheap; a stage's own module holds its documentation.
"""

from __future__ import annotations

import importlib
from typing import Any

_STAGES = {
    # train and evaluate
    "TrainedRun": "train",
    "train_model": "train",
    "resume_config": "train",
    "evaluate_run": "evaluate",
    # what several stages share
    "build_model_for": "common",
    "data_splits_for": "common",
    "evaluation_data": "common",
    "run_task": "common",
    # distill, pretrain, fine-tune
    "distill": "distill",
    "evaluate_run_heads": "distill",
    "PretrainedRun": "pretrain",
    "pretrain_mae": "pretrain",
    "explora_pretrain": "pretrain",
    "finetune": "finetune",
    "finetune_config": "finetune",
    # compress
    "quantize_run": "quantize",
    "reduce_tokens_run": "compress",
    "prune_run": "compress",
    "reparam_run": "compress",
    "train_with_exits": "compress",
    "evaluate_exit_run": "compress",
    "compare_runs": "compare",
    # deploy
    "export_run": "export",
    "bench_run": "bench",
    "write_report": "report",
    # analyses
    "run_attack": "analyze",
    "run_perturb": "analyze",
    "run_similarity": "analyze",
    "run_attention": "analyze",
    "run_artifacts": "analyze",
    "run_mil": "analyze",
}

__all__ = sorted(_STAGES)


def __getattr__(name: str) -> Any:
    module = _STAGES.get(name)
    if module is None:
        raise AttributeError(f"module 'vitkit.api' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"vitkit.stages.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

"""The one training loop, its configuration, objectives, callbacks and evaluation."""

from vitkit.train.callbacks import Callback, TrainContext
from vitkit.train.config import TrainConfig, build_config, format_validation_error
from vitkit.train.evaluate import (
    classification_metrics,
    evaluate,
    expected_calibration_error,
    multilabel_metrics,
    predict,
    save_confusion_matrix,
)
from vitkit.train.loop import (
    FitResult,
    TrainingInterrupted,
    fit,
    resolve_device,
    weight_checksum,
)
from vitkit.train.objectives import ClassificationObjective, Objective, ObjectiveOutput
from vitkit.train.optim import build_optimizer, build_scheduler, lion_from_adamw
from vitkit.train.precision import bf16_cpu_conv_hazard, bf16_is_fast, resolve_precision
from vitkit.train.sam import SAM

__all__ = [
    "SAM",
    "Callback",
    "ClassificationObjective",
    "FitResult",
    "Objective",
    "ObjectiveOutput",
    "TrainConfig",
    "TrainContext",
    "TrainingInterrupted",
    "bf16_cpu_conv_hazard",
    "bf16_is_fast",
    "build_config",
    "build_optimizer",
    "build_scheduler",
    "classification_metrics",
    "evaluate",
    "expected_calibration_error",
    "fit",
    "format_validation_error",
    "lion_from_adamw",
    "multilabel_metrics",
    "predict",
    "resolve_device",
    "resolve_precision",
    "save_confusion_matrix",
    "weight_checksum",
]

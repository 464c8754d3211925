"""Multi-label classification: any number of classes per image (multi-hot targets); binary
cross-entropy per class; per-class and mean AUROC, per-class AP and mAP, label accuracy, exact match."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitkit.errors import VitkitError
from vitkit.tasks.base import ExportSignature, Task, TensorSpec, register_task
from vitkit.tasks.classification import image_input

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitkit.config.train import TrainConfig
    from vitkit.data import DataSplits
    from vitkit.train.objectives import Objective


@register_task
class MultiLabelTask(Task):
    name = "multilabel"
    target = "multi_hot"
    # folders and the bundled sets hold one label per image; these can hold several
    data_schemes = ("csv", "npz", "mosaic")
    summary_keys = ("mean_auroc", "mAP", "label_accuracy", "exact_match")
    headline = "val_mean_auroc"
    val_metrics = ("loss", "mean_auroc", "mAP")

    def check_data(self, data: DataSplits) -> None:
        if not data.multilabel:
            raise VitkitError(
                f"{data.train.name}: one label per image; task 'multilabel' needs several "
                "(csv with several labels per row, npz with multi-hot y, or mosaic:URI)"
            )

    def loss(self, cfg: TrainConfig) -> Objective:
        from vitkit.train.objectives import ClassificationObjective

        if cfg.loss == "ce":
            raise VitkitError("loss 'ce' was asked for, but the data is multi-label: use --loss bce")
        return ClassificationObjective("bce", label_smoothing=cfg.label_smoothing)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, **_: Any) -> dict[str, Any]:
        from vitkit.tasks.metrics import multilabel_metrics

        return multilabel_metrics(outputs, targets)

    def export_signature(self, model: nn.Module) -> ExportSignature:
        k = getattr(model, "num_classes", None) or "K"
        return ExportSignature(
            (image_input(model),),
            (TensorSpec("logits", ("B", k), "float32", "one independent score per class"),),
            "sigmoid(logits) > 0.5 marks the classes present",
        )

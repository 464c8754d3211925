"""Single-label classification: one class per image; cross-entropy; top-1/top-5, per-class and
balanced accuracy, macro-F1, ECE, many/medium/few-shot accuracy and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitkit.errors import VitkitError
from vitkit.tasks.base import ExportSignature, Task, TensorSpec, register_task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitkit.config.train import TrainConfig
    from vitkit.data import DataSplits, ImageDataset
    from vitkit.train.objectives import Objective


def image_input(model: nn.Module) -> TensorSpec:
    """The one image input every single-image task exports."""
    from vitkit.models import model_input_size, model_normalization

    c, h, w = model_input_size(model)
    mean, std = model_normalization(model)
    return TensorSpec(
        "image",
        ("B", c, h, w),
        "float32",
        f"RGB/gray image in [0, 1], resized to {h}x{w}, normalized with mean {list(mean)} and std {list(std)}",
    )


@register_task
class ClassificationTask(Task):
    name = "classification"
    aliases = ("multiclass",)  # what model.json said before tasks existed
    target = "class_index"
    # mosaic: multi-label data, for which classification turns into multilabel (resolve_task)
    data_schemes = ("digits", "fashion-mnist", "folder", "csv", "npz", "mosaic")
    summary_keys = (
        "top1",
        "top5",
        "balanced_accuracy",
        "macro_f1",
        "ece",
        "many_shot_accuracy",
        "medium_shot_accuracy",
        "few_shot_accuracy",
    )
    headline = "val_top1"
    val_metrics = ("loss", "top1", "balanced_accuracy")

    def check_data(self, data: DataSplits) -> None:
        if data.train.boxes:
            raise VitkitError(f"{data.train.name}: boxes; train them with --task detection")
        if data.train.dense:
            raise VitkitError(
                f"{data.train.name}: per-pixel masks; train them with --task segmentation (or change for image pairs)"
            )
        if data.multilabel:
            raise VitkitError(f"{data.train.name}: multi-label data; train it with --task multilabel")

    def loss(self, cfg: TrainConfig) -> Objective:
        from vitkit.train.objectives import ClassificationObjective

        if cfg.loss == "bce":
            raise VitkitError(
                "loss 'bce' needs multi-label data (e.g. csv with several labels per row, or mosaic:URI)"
            )
        return ClassificationObjective("ce", label_smoothing=cfg.label_smoothing)

    def metrics(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        class_counts: list[int] | None = None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        **_: Any,
    ) -> dict[str, Any]:
        from vitkit.tasks.metrics import classification_metrics

        return classification_metrics(
            outputs,
            targets,
            class_counts=class_counts,
            many_threshold=many_threshold,
            few_threshold=few_threshold,
        )

    def evaluate(self, model, data, out_dir=None, *, outputs=None, **kwargs):  # type: ignore[override]
        """The metrics; for data with group ids (``info["groups"]``: e.g. crops of a detect -> crop ->
        classify pipeline, a patient per image) also the group-level ones (:func:`group_metrics`)."""
        groups = data.info.get("groups")
        if groups is None:
            return super().evaluate(model, data, out_dir, outputs=outputs, **kwargs)
        from vitkit.tasks.metrics import group_metrics

        if outputs is None:
            kw = {k: kwargs[k] for k in ("batch_size", "device", "precision", "transform") if k in kwargs}
            outputs = self.predict(model, data, **kw)
        out = super().evaluate(model, data, None, outputs=outputs, **kwargs)
        out.update(group_metrics(outputs, data.targets, groups))
        if out_dir is not None:
            self.write_outputs(out, data, out_dir)
        return out

    def write_plots(self, metrics: dict[str, Any], data: ImageDataset, out_dir: Path) -> list[str]:
        from vitkit.report.plots import save_confusion_matrix

        if "confusion_matrix" not in metrics:
            return []
        save_confusion_matrix(metrics["confusion_matrix"], data.classes, out_dir / "confusion_matrix.png")
        return ["confusion_matrix.png"]

    def output_files(self, metrics: dict[str, Any]) -> list[str]:
        return ["metrics.json", *(["confusion_matrix.png"] if "confusion_matrix" in metrics else [])]

    def export_signature(self, model: nn.Module) -> ExportSignature:
        k = getattr(model, "num_classes", None) or "K"
        return ExportSignature(
            (image_input(model),),
            (TensorSpec("logits", ("B", k), "float32", "one score per class (softmax gives probabilities)"),),
            "argmax over classes is the predicted class",
        )

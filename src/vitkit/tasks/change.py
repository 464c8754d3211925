"""Change detection: two images of one place in, a change mask out (class 1: changed).

Heads: the siamese difference baseline (``upernet`` / ``linear`` over |pyramid(A) - pyramid(B)|) and
ChangeViT (``--head changevit``: Zhu et al., "ChangeViT: Unleashing Plain Vision Transformers for Change
Detection", 2024; ``vitkit.models.changevit``), trained with its BCE + Dice loss by default.

Samples are image pairs stacked on the channel axis (``(N, 2C, H, W)``: the first date's channels,
then the second's; ``pairs:PATH`` in the LEVIR-CD layout or the generated ``canvas-change``). The
model (``vitkit.models.dense.ChangeModel``) runs one ViT on both dates with shared weights and
decodes the absolute difference of their feature pyramids: the siamese difference baseline.
Loss: per-pixel cross-entropy over {unchanged, changed}. Metrics of the change class (torchmetrics):
F1, precision, recall, IoU, plus overall pixel accuracy; overlays show both dates, truth and
prediction.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from vitkit.tasks.base import ExportSignature, TensorSpec, register_task
from vitkit.tasks.segmentation import IGNORE_INDEX, DenseOptions, DenseTask


class ChangeOptions(DenseOptions):
    """``--task change:key=value,...``: the segmentation options, ChangeViT's head and the loss."""

    head: Literal["linear", "upernet", "changevit"] = Field(
        "upernet", description="decoder head (also --head); changevit: Zhu et al. 2024"
    )
    detail_width: int = Field(64, ge=4, le=512, multiple_of=4, description="changevit: CNN widths w, 2w, 4w")
    loss: Literal["auto", "ce", "bce_dice"] = Field(
        "auto", description="per-pixel loss: auto = bce_dice for changevit (its paper), ce otherwise"
    )


def change_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """F1, precision, recall and IoU of the change class, and pixel accuracy, over label maps."""
    from torchmetrics.classification import (
        BinaryAccuracy,
        BinaryF1Score,
        BinaryJaccardIndex,
        BinaryPrecision,
        BinaryRecall,
    )

    valid = targets != IGNORE_INDEX
    p, t = preds[valid], targets[valid]
    return {
        "n": len(preds),
        "pixels": int(valid.sum()),
        "changed_fraction": float(t.float().mean()) if t.numel() else float("nan"),
        "change_f1": float(BinaryF1Score()(p, t)),
        "change_precision": float(BinaryPrecision()(p, t)),
        "change_recall": float(BinaryRecall()(p, t)),
        "change_iou": float(BinaryJaccardIndex()(p, t)),
        "pixel_accuracy": float(BinaryAccuracy()(p, t)),
    }


@register_task
class ChangeTask(DenseTask):
    name = "change"
    pair_data = True
    data_schemes = ("canvas-change", "pairs")
    summary_keys = ("change_f1", "change_precision", "change_recall", "change_iou", "pixel_accuracy")
    headline = "val_change_f1"
    val_metrics = ("change_f1", "change_iou")
    Options = ChangeOptions

    @property
    def pixel_loss(self) -> str:
        o = self.options
        if o.loss == "auto":
            return "bce_dice" if o.head == "changevit" else "ce"
        return o.loss

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor, **_: Any) -> dict[str, Any]:
        out = change_metrics(outputs, targets)
        out["task"] = self.spec
        return out

    def _overlay_title(self, metrics: dict[str, Any]) -> str:
        return f"{self.spec}: F1 {metrics.get('change_f1', float('nan')):.3f}"

    def export_signature(self, model: nn.Module) -> ExportSignature:
        from vitkit.models import model_input_size, model_normalization

        c2, h, w = model_input_size(model)
        mean, std = model_normalization(model)
        inp = TensorSpec(
            "image_pair",
            ("B", c2, h, w),
            "float32",
            f"the two dates stacked on channels (first date's {c2 // 2}, then the second's), each in [0, 1] "
            f"resized to {h}x{w} and normalized with mean {list(mean)} and std {list(std)}",
        )
        out = TensorSpec("logits", ("B", 2, h, w), "float32", "unchanged / changed score per pixel")
        return ExportSignature((inp,), (out,), "argmax over axis 1 is the change mask (1: changed)")

"""Semantic segmentation: a class per pixel (255: ignore); cross-entropy; mIoU, per-class IoU, pixel
accuracy and mean class accuracy (torchmetrics); overlays of image, truth and prediction.

The model is a plain timm ViT wrapped in a dense head (``vitkit.models.dense``: ``linear`` or
``upernet`` over a ViTDet simple feature pyramid); ``--head`` or the task options choose it. Data:
``canvas`` (generated, vitkit.data.canvas) or ``segfolder:PATH`` (images/ + masks/). Augmentation
moves image and mask together (:class:`vitkit.data.DenseBatchTransform`: scale-crop via
``--scale-min``, ``--translate``, ``--hflip``); image-label augmentations (RandAugment, mixup,
cutmix, erasing) and class-aware sampling are refused.

mIoU is the mean over the classes present in the ground truth or the predictions of the evaluated
set (classes with an empty union are NaN in ``per_class_iou`` and left out), as MMSegmentation
averages: torchmetrics' macro average would count such a class as IoU 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.data.dense import IGNORE_INDEX
from vitkit.errors import VitkitError
from vitkit.tasks.base import ExportSignature, Task, TensorSpec, refuse_image_label_options, register_task
from vitkit.train.objectives import Objective, ObjectiveOutput

if TYPE_CHECKING:
    from vitkit.config.train import TrainConfig
    from vitkit.data import DataSplits, ImageDataset

OVERLAY_SAMPLES = 6


class DenseOptions(BaseModel):
    """``--task segmentation:key=value,...`` (``change`` takes the same)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    head: Literal["linear", "upernet"] = Field("upernet", description="decoder head (also --head)")
    pyramid: Literal["sfp", "multilevel"] = Field(
        "sfp", description="upernet's pyramid: ViTDet's from the last block, or four blocks"
    )
    channels: int | None = Field(
        None, gt=0, le=1024, description="upernet width (default: the ViT's, 32-256)"
    )


class SegmentationOptions(DenseOptions):
    """``--task segmentation:key=value,...``: the dense options and ViT-P's."""

    head: Literal["linear", "upernet", "vitp"] = Field(
        "upernet",
        description="decoder head (also --head); vitp: ViT-P over a trained segmenter (vitkit finetune RUN --head vitp)",
    )
    points: int = Field(32, ge=1, le=1024, description="vitp: points per image in training and per chunk")
    alpha: float = Field(0.4, ge=0.0, le=1.0, description="vitp: weight of ViT-P's classes in the fusion")


class PointObjective(Objective):
    """ViT-P's loss (``vitkit.models.vitp``): cross-entropy of the class of ``n_points`` points per
    image, drawn class-uniformly from the ground truth (official ``nn.CrossEntropyLoss()`` over the
    points); validation: point accuracy at fixed (seeded) points."""

    task = "none"

    def __init__(self, n_points: int = 16, val_seed: int = 0):
        self.n_points = n_points
        self.val_seed = val_seed

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        from vitkit.models.vitp import sample_points

        points, labels = sample_points(targets, self.n_points)
        logits = model(images, points)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return ObjectiveOutput(loss)

    @torch.no_grad()
    def validate(self, model, val_data, transform, device, precision, batch_size) -> dict[str, float]:
        """Point accuracy on the validation masks, with fixed points (seeded)."""
        from vitkit.models.vitp import sample_points

        g = torch.Generator().manual_seed(self.val_seed)
        was = model.training
        model.eval()
        right = total = 0
        loss_sum = 0.0
        for i in range(0, len(val_data), batch_size):
            images = transform.images(val_data.images[i : i + batch_size])
            # points are fractions of the mask's size, so the mask need not be resized with the image
            points, labels = sample_points(val_data.targets[i : i + batch_size], self.n_points, g)
            logits = model(images.to(device), points.to(device)).float()
            keep = labels.to(device) != IGNORE_INDEX
            right += int((logits.argmax(-1) == labels.to(device))[keep].sum())
            total += int(keep.sum())
            loss_sum += float(F.cross_entropy(logits[keep], labels.to(device)[keep], reduction="sum"))
        model.train(was)
        return {"val_point_accuracy": right / max(total, 1), "val_loss": loss_sum / max(total, 1)}

    def describe(self) -> dict:
        return {"name": "vitp_points", "n_points": self.n_points}


class DenseObjective(Objective):
    """Per-pixel cross-entropy (``loss="ce"``); pixels labelled ``ignore_index`` carry no loss.
    ``loss="bce_dice"`` (two classes): ChangeViT's BCE + batch Dice on the binary score
    ``logits[:, 1] - logits[:, 0]`` (``vitkit.models.changevit.bce_dice_loss``)."""

    def __init__(
        self,
        task: str,
        ignore_index: int = IGNORE_INDEX,
        class_weights: list[float] | None = None,
        loss: str = "ce",
    ):
        self.task = task
        self.ignore_index = ignore_index
        self.class_weights = class_weights
        self.loss = loss

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        logits = model(images)
        if self.loss == "bce_dice":
            from vitkit.models.changevit import bce_dice_loss

            z = logits[:, 1].float() - logits[:, 0].float()
            return ObjectiveOutput(bce_dice_loss(z, targets, self.ignore_index))
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, device=logits.device, dtype=torch.float32)
        loss = F.cross_entropy(logits.float(), targets, weight=weight, ignore_index=self.ignore_index)
        return ObjectiveOutput(loss)

    def describe(self) -> dict:
        return {
            "name": "pixel_cross_entropy",
            "ignore_index": self.ignore_index,
            "class_weights": self.class_weights,
        }


def segmentation_metrics(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel accuracy, mean class accuracy of label maps (N, H, W), all from one
    confusion matrix (torchmetrics' ``MulticlassConfusionMatrix``, ignored pixels left out)."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    valid = targets != IGNORE_INDEX
    p = torch.where(valid, preds.clamp(0, num_classes - 1), IGNORE_INDEX)
    cm = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)(p, targets).double()
    tp = cm.diag()
    truth, predicted = cm.sum(1), cm.sum(0)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(truth > 0, tp / truth.clamp(min=1), torch.nan)
    total = float(cm.sum())

    def listed(v: torch.Tensor) -> list[float | None]:
        return [None if math.isnan(x) else float(x) for x in v.tolist()]

    return {
        "n": len(preds),
        "pixels": int(total),
        "miou": float(iou.nanmean()) if not iou.isnan().all() else float("nan"),
        "per_class_iou": listed(iou),
        "pixel_accuracy": float(tp.sum()) / total if total else float("nan"),
        "mean_accuracy": float(acc.nanmean()) if not acc.isnan().all() else float("nan"),
        "per_class_accuracy": listed(acc),
        "confusion_matrix": cm.long().tolist(),
    }


class DenseTask(Task):
    """What segmentation and change detection share: masks as targets, the dense head, the joint
    batch transform, label-map predictions, overlays."""

    dense = True
    head_model = True
    figures = (("overlays: image, truth, prediction", "overlays.png"),)
    target = "mask"
    pair_data: ClassVar[bool] = False
    Options = DenseOptions

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options)
        self._overlay: tuple[torch.Tensor, torch.Tensor] | None = None  # (indices, predictions)

    # -- data and configuration ----------------------------------------------------------------
    def check_data(self, data: DataSplits) -> None:
        kind = "image pairs with change masks" if self.pair_data else "images with class masks"
        if not data.train.dense or data.train.pair != self.pair_data:
            raise VitkitError(
                f"{data.train.name}: task '{self.name}' needs {kind} ({', '.join(self.data_schemes)})"
            )

    def check_config(self, cfg: TrainConfig) -> None:
        refuse_image_label_options(self.name, cfg, "masks", "per-pixel cross-entropy")
        from vitkit.registry import parse_transform_spec, technique

        for spec in cfg.transforms:  # only those registered for dense models (Technique.applies_to)
            name = parse_transform_spec(spec)[0]
            if technique(name).applies_to not in ("dense", "any"):
                raise VitkitError(
                    f"task '{self.name}' takes no --transform {name}: dense heads read the ViT's full "
                    "token grid, which token reduction or an image-classifier transform would break"
                )
        if cfg.head is not None and cfg.head != self.options.head:
            from pydantic import ValidationError

            try:  # validated: --head changevit is not a segmentation head
                self.options = type(self.options)(**{**self.options.model_dump(), "head": cfg.head})
            except ValidationError as e:
                from vitkit.registry import format_validation_error

                raise VitkitError(format_validation_error(e, f"--head for task '{self.name}'")) from e

    # -- model ---------------------------------------------------------------------------------
    def build_head(self, model: nn.Module, num_outputs: int) -> nn.Module:
        from vitkit.models.dense import attach_dense_head, default_head_config

        o = self.options
        if o.head == "vitp":
            raise VitkitError(
                "head vitp reclassifies the regions of a trained segmentation run: train that run first, then "
                "`vitkit finetune SEG_RUN --task segmentation --head vitp -o OUT`"
            )
        extra = {"detail_width": o.detail_width} if hasattr(o, "detail_width") else {}
        cfg = default_head_config(
            model, num_outputs, task=self.name, head=o.head, pyramid=o.pyramid, channels=o.channels, **extra
        )
        return attach_dense_head(model, cfg)

    def check_head(self, model: nn.Module, data: DataSplits, model_name: str) -> None:
        from vitkit.models.dense import DenseModel
        from vitkit.models.vitp import ViTPSegmenter

        cfg = getattr(model, "config", None)
        if not isinstance(model, (DenseModel, ViTPSegmenter)) or cfg is None or cfg.task != self.name:
            raise VitkitError(f"model '{model_name}' has no {self.name} head")
        super().check_head(model, data, model_name)

    # -- training ------------------------------------------------------------------------------
    def loss(self, cfg: TrainConfig) -> Objective:
        self.check_config(cfg)
        if self.options.head == "vitp":
            return PointObjective(self.options.points, val_seed=cfg.seed)
        return DenseObjective(self.name, loss=self.pixel_loss)

    @property
    def pixel_loss(self) -> str:
        return "ce"

    def batch_transforms(self, cfg: TrainConfig, model: nn.Module, data: DataSplits):
        from vitkit.data import AugmentConfig, DenseBatchTransform
        from vitkit.models import model_input_size, model_normalization

        c, h, w = model_input_size(model)
        c = c // 2 if self.pair_data else c
        mean, std = model_normalization(model)
        size = cfg.img_size or (h, w)
        augment = AugmentConfig(scale=(cfg.scale_min, 1.0), translate=cfg.translate, hflip=cfg.hflip)
        train = DenseBatchTransform(size, c, mean, std, train=True, augment=augment, pair=self.pair_data)
        return train, self.eval_transform(model, cfg.img_size)

    def eval_transform(self, model: nn.Module, img_size: int | None = None):
        from vitkit.models.inference import eval_transform

        return eval_transform(model, img_size, pair=self.pair_data)

    # -- evaluation ----------------------------------------------------------------------------
    def predict(
        self,
        model: nn.Module,
        data: ImageDataset,
        *,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        transform: Any = None,
    ) -> torch.Tensor:
        """Predicted label maps (N, H, W) int64 at the masks' resolution (logits resized
        bilinearly first when the model runs at another size)."""
        from vitkit.models.inference import autocast_context

        tf = transform or self.eval_transform(model)
        device = torch.device(device)
        was_training = model.training
        model.eval()
        out = torch.empty(data.targets.shape, dtype=torch.long)
        size = tuple(data.targets.shape[-2:])
        try:
            with torch.no_grad(), autocast_context(device, precision):
                for i in range(0, len(data), batch_size):
                    x = tf.images(data.images[i : i + batch_size]).to(device)
                    logits = model(x).float()
                    if tuple(logits.shape[-2:]) != size:
                        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                    out[i : i + len(x)] = logits.argmax(1).cpu()
        finally:
            model.train(was_training)
        return out

    def evaluate(self, model, data, out_dir=None, *, outputs=None, **kwargs):  # type: ignore[override]
        if outputs is None:
            kw = {k: kwargs[k] for k in ("batch_size", "device", "precision", "transform") if k in kwargs}
            outputs = self.predict(model, data, **kw)
        idx = overlay_indices(data)
        self._overlay = (idx, outputs[idx].clone())  # what write_plots draws
        return super().evaluate(model, data, out_dir, outputs=outputs, **kwargs)

    def metrics(
        self, outputs: torch.Tensor, targets: torch.Tensor, *, num_classes: int | None = None, **_: Any
    ) -> dict[str, Any]:
        if num_classes is None:  # the classes seen; pass the dataset's so absent classes show as None
            t = targets[targets != IGNORE_INDEX]
            num_classes = 1 + max(
                int(outputs.max()) if outputs.numel() else 0, int(t.max()) if t.numel() else 0
            )
        out = segmentation_metrics(outputs, targets, num_classes)
        out["task"] = self.spec
        return out

    def write_plots(self, metrics: dict[str, Any], data: ImageDataset, out_dir: Path) -> list[str]:
        if self._overlay is None:
            return []
        idx, preds = self._overlay
        if len(idx) == 0 or int(idx.max()) >= len(data):
            return []
        from vitkit.report.plots import save_mask_overlays

        save_mask_overlays(
            data.images[idx].numpy(),
            data.targets[idx].numpy(),
            preds.numpy(),
            list(data.classes),
            out_dir / "overlays.png",
            pair=self.pair_data,
            title=self._overlay_title(metrics),
            ignore_index=IGNORE_INDEX,
        )
        return ["overlays.png"]

    def _overlay_title(self, metrics: dict[str, Any]) -> str:
        return f"{self.spec}: mIoU {metrics.get('miou', float('nan')):.3f}"

    def output_files(self, metrics: dict[str, Any]) -> list[str]:
        return ["metrics.json", "overlays.png"]

    def export_signature(self, model: nn.Module) -> ExportSignature:
        from vitkit.tasks.classification import image_input

        k = getattr(model, "num_classes", None) or "K"
        inp = image_input(model)
        return ExportSignature(
            (inp,),
            (TensorSpec("logits", ("B", k, *inp.shape[2:]), "float32", "one score per class and pixel"),),
            "argmax over the class axis (1) is the predicted label map",
        )


def overlay_indices(data: ImageDataset, n: int = OVERLAY_SAMPLES) -> torch.Tensor:
    """Evenly spaced samples of ``data`` for the overlay figure (the same ones every evaluation)."""
    if len(data) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, len(data) - 1, min(n, len(data))).round().long().unique()


@register_task
class SegmentationTask(DenseTask):
    name = "segmentation"
    Options = SegmentationOptions
    data_schemes = ("canvas", "segfolder")
    summary_keys = ("miou", "pixel_accuracy", "mean_accuracy")
    headline = "val_miou"
    val_metrics = ("miou", "pixel_accuracy")

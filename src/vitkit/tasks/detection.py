"""Object detection: boxes and their classes per image.

The model is a plain timm ViT under ViTDet's simple feature pyramid and a detector: torchvision's
FCOS (``vitkit.models.detection``; ``--task detection``, the default) or transformers' Deformable
DETR (``vitkit.models.detr``; ``--detector detr``), the latter optionally trained as Co-DETR
(``vitkit.models.codetr``; ``--detector co-detr``). Data: ``canvas-boxes`` (generated,
vitkit.data.canvas: the items' visible boxes) or ``coco:PATH`` (a COCO annotation file; data/boxes.py).
Augmentation moves images and boxes together (:class:`vitkit.data.boxes.BoxBatchTransform`:
``--scale-min`` scale-crop, ``--translate``, ``--hflip``; a box cut to under a quarter of its area is
dropped). Metrics: torchmetrics' ``MeanAveragePrecision`` (pycocotools' COCO evaluation): ``map``
(mAP@[.5:.95]), ``map_50``, ``map_75``, ``mar_100`` and per-class AP. Evaluation draws true and
predicted boxes (``detections.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitkit.errors import VitkitError
from vitkit.tasks.base import ExportSignature, Task, refuse_image_label_options, register_task
from vitkit.train.objectives import Objective, ObjectiveOutput

if TYPE_CHECKING:
    from vitkit.config.train import TrainConfig
    from vitkit.data import DataSplits, ImageDataset

DRAWN_SAMPLES = 6


class DetectionOptions(BaseModel):
    """``--task detection:key=value,...``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: Literal["fcos", "deformable-detr", "co-detr"] = Field(
        "fcos",
        description="detector: fcos (torchvision's FCOS), deformable-detr (transformers' Deformable DETR) or "
        "co-detr (that DETR trained with Co-DETR's auxiliary heads and positive queries)",
    )
    queries: int = Field(50, ge=1, le=1000, description="deformable-detr, co-detr: object queries")
    co_heads: Literal["atss+rcnn", "atss", "rcnn"] = Field(
        "atss+rcnn",
        description="co-detr: the auxiliary one-to-many heads (the paper's: ATSS and Faster R-CNN)",
    )
    channels: int | None = Field(
        None, gt=0, le=1024, multiple_of=32, description="pyramid and head width (default: the ViT's, 32-256)"
    )


class DetectionObjective(Objective):
    """The detector's own losses, summed (FCOS: sigmoid focal classification, GIoU box regression,
    centerness BCE)."""

    task = "none"

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> ObjectiveOutput:
        from vitkit.data.boxes import unpack_boxes

        losses = model(images, unpack_boxes(targets))
        return ObjectiveOutput(sum(v.float() for v in losses.values()))

    def describe(self) -> dict:
        return {"name": "detector_losses"}


def detection_metrics(
    outputs: list[dict[str, torch.Tensor]], targets: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """COCO box metrics of per-image predictions against (N, M, 5) padded targets (torchmetrics'
    ``MeanAveragePrecision``, pycocotools backend)."""
    from torchmetrics.detection import MeanAveragePrecision

    from vitkit.data.boxes import unpack_boxes

    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools"
    )
    metric.update(
        [{k: v.float() if k != "labels" else v.long() for k, v in o.items()} for o in outputs],
        unpack_boxes(targets),
    )
    r = metric.compute()

    def value(key: str) -> float | None:
        v = float(r[key])
        return None if v < 0 else v  # -1: no box of that kind in the set

    per_class: list[float | None] = [None] * num_classes
    for c, ap in zip(r["classes"].flatten().tolist(), r["map_per_class"].flatten().tolist()):
        if 0 <= int(c) < num_classes:
            per_class[int(c)] = None if ap < 0 else float(ap)
    n_boxes = int((targets[..., 0] >= 0).sum())
    return {
        "n": len(outputs),
        "boxes": n_boxes,
        "map": value("map") or 0.0,
        "map_50": value("map_50") or 0.0,
        "map_75": value("map_75") or 0.0,
        "mar_100": value("mar_100") or 0.0,
        "per_class_ap": per_class,
    }


@register_task
class DetectionTask(Task):
    name = "detection"
    target = "boxes"
    data_schemes = ("canvas-boxes", "coco")
    summary_keys = ("map", "map_50", "map_75")
    headline = "val_map_50"
    val_metrics = ("map", "map_50")
    Options = DetectionOptions
    head_model = True
    figures = (("boxes: truth and prediction", "detections.png"),)

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options)
        self._drawn: tuple[torch.Tensor, list[dict[str, torch.Tensor]]] | None = None

    # -- data and configuration ----------------------------------------------------------------
    def check_uri(self, uri: str) -> None:
        if uri == "canvas" or uri.startswith("canvas:"):
            raise VitkitError(
                f"task 'detection' reads boxes: '{uri}' holds masks; use canvas-boxes{uri[6:]} (the same canvases)"
            )
        super().check_uri(uri)

    def check_data(self, data: DataSplits) -> None:
        if not data.train.boxes:
            raise VitkitError(
                f"{data.train.name}: task 'detection' needs boxes ({', '.join(self.data_schemes)} data)"
            )

    def check_config(self, cfg: TrainConfig) -> None:
        refuse_image_label_options(self.name, cfg, "boxes", "the detector's own losses")
        if cfg.transforms:
            raise VitkitError(
                "task 'detection' takes no --transform yet (the detector reads the ViT's full token grid)"
            )
        if cfg.head is not None:
            raise VitkitError(
                f"--head {cfg.head}: detection chooses its head with --detector (fcos, detr, co-detr)"
            )
        if cfg.detector is not None and cfg.detector != self.options.detector:
            self.options = type(self.options)(**{**self.options.model_dump(), "detector": cfg.detector})

    # -- model ---------------------------------------------------------------------------------
    def num_outputs(self, data: DataSplits) -> int:
        return data.train.num_classes

    def build_head(self, model: nn.Module, num_outputs: int) -> nn.Module:
        from vitkit.models.dense import default_head_config
        from vitkit.models.heads import attach_head

        o = self.options
        cfg = default_head_config(
            model,
            num_outputs,
            task="detection",
            head=o.detector,
            channels=o.channels,
            queries=o.queries,
            co_heads=tuple(o.co_heads.split("+")),
        )
        return attach_head(model, cfg)

    def check_head(self, model: nn.Module, data: DataSplits, model_name: str) -> None:
        from vitkit.models.detection import DetectionModel
        from vitkit.models.detr import DetrDetectionModel

        if not isinstance(model, (DetectionModel, DetrDetectionModel)):
            raise VitkitError(f"model '{model_name}' has no detection head")
        if model.num_classes != data.train.num_classes:
            raise VitkitError(
                f"model '{model_name}' detects {model.num_classes} classes; the data has {data.train.num_classes}"
            )

    # -- training ------------------------------------------------------------------------------
    def loss(self, cfg: TrainConfig) -> Objective:
        self.check_config(cfg)
        return DetectionObjective()

    def batch_transforms(self, cfg: TrainConfig, model: nn.Module, data: DataSplits):
        from vitkit.data import AugmentConfig
        from vitkit.data.boxes import BoxBatchTransform
        from vitkit.models import model_input_size, model_normalization

        c, h, w = model_input_size(model)
        mean, std = model_normalization(model)
        augment = AugmentConfig(scale=(cfg.scale_min, 1.0), translate=cfg.translate, hflip=cfg.hflip)
        train = BoxBatchTransform((h, w), c, mean, std, train=True, augment=augment)
        return train, self.eval_transform(model)

    def eval_transform(self, model: nn.Module, img_size: int | None = None):
        from vitkit.data.boxes import BoxBatchTransform
        from vitkit.models import model_input_size, model_normalization

        c, h, w = model_input_size(model)
        mean, std = model_normalization(model)
        return BoxBatchTransform((h, w), c, mean, std)

    # -- evaluation ----------------------------------------------------------------------------
    def predict(  # type: ignore[override]
        self,
        model: nn.Module,
        data: ImageDataset,
        *,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        transform: Any = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes", "scores", "labels"}`` on CPU, boxes in the dataset image's pixels."""
        from vitkit.models.inference import autocast_context

        tf = transform or self.eval_transform(model)
        device = torch.device(device)
        h, w = data.images.shape[-2:]
        sy, sx = h / tf.size[0], w / tf.size[1]
        scale = torch.tensor([sx, sy, sx, sy])
        was_training = model.training
        model.eval()
        out: list[dict[str, torch.Tensor]] = []
        try:
            with torch.no_grad(), autocast_context(device, precision):
                for i in range(0, len(data), batch_size):
                    x = tf.images(data.images[i : i + batch_size]).to(device)
                    for d in model(x):
                        out.append(
                            {
                                "boxes": d["boxes"].float().cpu() * scale,
                                "scores": d["scores"].float().cpu(),
                                "labels": d["labels"].long().cpu(),
                            }
                        )
        finally:
            model.train(was_training)
        return out

    def metrics(  # type: ignore[override]
        self,
        outputs: list[dict[str, torch.Tensor]],
        targets: torch.Tensor,
        *,
        num_classes: int | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        if num_classes is None:
            labels = targets[..., 0]
            num_classes = 1 + int(labels.max()) if (labels >= 0).any() else 1
        out = detection_metrics(outputs, targets, num_classes)
        out["task"] = self.spec
        return out

    def evaluate(self, model, data, out_dir=None, *, outputs=None, **kwargs):  # type: ignore[override]
        if outputs is None:
            kw = {k: kwargs[k] for k in ("batch_size", "device", "precision", "transform") if k in kwargs}
            outputs = self.predict(model, data, **kw)
        n = len(data)
        idx = torch.linspace(0, n - 1, min(DRAWN_SAMPLES, n)).round().long().unique() if n else torch.zeros(0)
        self._drawn = (idx, [outputs[int(i)] for i in idx])
        return super().evaluate(model, data, out_dir, outputs=outputs, **kwargs)

    def write_plots(self, metrics: dict[str, Any], data: ImageDataset, out_dir: Path) -> list[str]:
        if self._drawn is None or len(self._drawn[0]) == 0 or int(self._drawn[0].max()) >= len(data):
            return []
        from vitkit.data.boxes import unpack_boxes
        from vitkit.report.plots import save_box_overlays

        idx, preds = self._drawn
        truths = [(t["boxes"].numpy(), t["labels"].numpy()) for t in unpack_boxes(data.targets[idx])]
        shown = [(p["boxes"].numpy(), p["labels"].numpy(), p["scores"].numpy()) for p in preds]
        title = f"{self.spec}: mAP {metrics.get('map', float('nan')):.3f}, mAP50 {metrics.get('map_50', float('nan')):.3f}"
        save_box_overlays(
            data.images[idx].numpy(),
            truths,
            shown,
            list(data.classes),
            out_dir / "detections.png",
            title=title,
        )
        return ["detections.png"]

    def output_files(self, metrics: dict[str, Any]) -> list[str]:
        return ["metrics.json", "detections.png"]

    def export_signature(self, model: nn.Module) -> ExportSignature:
        from vitkit.tasks.base import TensorSpec
        from vitkit.tasks.classification import image_input

        k = getattr(model, "num_classes", None) or "K"
        inp = image_input(model)
        raw = TensorSpec(
            "logits", ("B", "A", f"{k}+5"), "float32", "per anchor: class logits, 4 box deltas, centerness"
        )
        return ExportSignature(
            (inp,),
            (raw,),
            "DetectionModel.decode: FCOS box decoding against the anchors, scores, class-wise NMS",
        )

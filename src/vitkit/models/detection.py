"""Object detection over a plain timm ViT: ViTDet's simple feature pyramid from the last block
(``models/dense.py``'s :class:`FeaturePyramid`), under torchvision's FCOS (Tian et al., "FCOS: Fully
Convolutional One-Stage Object Detection", ICCV 2019): per pyramid level, a shared 4-conv
classification tower (sigmoid focal loss), box regression (l, t, r, b; GIoU loss) and centerness.

Why torchvision's FCOS (issue 20 names torchvision's detection models as one choice): it is
maintained with torchvision, it takes any module as its backbone (a dict of feature maps with
``out_channels``), it is anchor-free and converges in a few CPU epochs on small images, where a
DETR needs long schedules; it has no compiled ops. Its own resizing and normalisation are neutral
here (``min_size = max_size`` = the model's input size, mean 0, std 1): vitkit's batch transforms
already give normalised images at that size.

Anchor sizes are the pyramid's strides (4, 8, 16, 32 px for a 16 px patch; FCOS's convention), so a
box whose largest side distance is under 4x the finest stride is regressed on the finest level.
Detections keep scores >= 0.05 (COCO evaluation's usual threshold, not torchvision's 0.2 display
default), at most 100 per image after NMS 0.6.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models.dense import (
    DenseHeadConfig,
    FeaturePyramid,
    _vit_parts,
    prefixed_group_matcher,
    wrap_in_head,
)
from vitkit.models.factory import model_input_size
from vitkit.models.manifest import get_manifest, set_manifest

SCORE_THRESHOLD = 0.05
DETECTIONS_PER_IMAGE = 100


class ViTPyramid(nn.Module):
    """A detector's "backbone": the ViT's chosen block(s) as maps -> the simple feature pyramid, as
    an ordered dict of (B, channels, h, w) maps, finest first (what torchvision's detectors take;
    :meth:`maps` gives the list)."""

    def __init__(self, vit: nn.Module, config: DenseHeadConfig):
        super().__init__()
        width, _, _ = _vit_parts(vit)
        self.vit = vit
        self.indices = list(config.indices)
        self.neck = FeaturePyramid(width, config.channels, len(config.indices), config.scales)
        self.out_channels = config.channels

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        blocks = self.vit.forward_intermediates(
            x, indices=self.indices, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return list(self.neck(blocks))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.maps(x)))


class DetectionModel(nn.Module):
    """(B, C, H, W) normalised images -> per image ``{"boxes" (k, 4) xyxy in input pixels, "scores",
    "labels"}`` (eval), or FCOS's loss dict when given targets in training mode."""

    def __init__(self, vit: nn.Module, config: DenseHeadConfig):
        super().__init__()
        from torchvision.models.detection import FCOS
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        c, h, w = model_input_size(vit)
        if h != w:
            raise VitkitError(f"detection: the ViT's input must be square, got {h}x{w}")
        patch = h // int(vit.patch_embed.grid_size[0])
        strides = [max(1, round(patch / s)) for s in config.scales]
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        self.config = config
        self.num_classes = config.num_classes
        self.detector = FCOS(
            ViTPyramid(vit, config),
            config.num_classes,
            min_size=h,
            max_size=h,
            image_mean=[0.0] * c,
            image_std=[1.0] * c,
            anchor_generator=anchors,
            score_thresh=SCORE_THRESHOLD,
            detections_per_img=DETECTIONS_PER_IMAGE,
            size_divisible=1,  # the ViT takes exactly its input size: no padding to 32
        )
        self.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", {}) or {})
        self.pretrained_cfg["input_size"] = (c, h, w)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 0))

    @property
    def backbone(self) -> nn.Module:
        """The ViT (what fine-tuning loads and layer decay groups)."""
        return self.detector.backbone.vit

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return prefixed_group_matcher(self.backbone, "detector.backbone.vit.", coarse)

    def no_weight_decay(self) -> set[str]:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"detector.backbone.vit.{n}" for n in inner}

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        return self.detector(list(images), targets)

    def export_module(self) -> nn.Module:
        """The part of the detector an ONNX graph holds: images -> raw per-anchor outputs
        (:class:`RawDetectorOutputs`); :meth:`decode` turns them into detections."""
        return RawDetectorOutputs(self)

    @torch.no_grad()
    def decode(self, raw: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections from raw outputs (B, A, K + 5) of :class:`RawDetectorOutputs` (e.g. onnxruntime's):
        FCOS's own post-processing (score >= 0.05 from sqrt(sigmoid(class) * sigmoid(centerness)),
        top-k, box decoding against the anchors, class-wise NMS 0.6)."""
        from torchvision.models.detection.image_list import ImageList

        det = self.detector
        k = self.num_classes
        size = tuple(self.pretrained_cfg["input_size"][1:])
        b = raw.shape[0]
        feats = self._level_shapes()
        dummy = [torch.zeros(b, 1, h, w) for h, w in feats]
        images = ImageList(torch.zeros(b, 1, *size), [size] * b)
        anchors = det.anchor_generator(images, dummy)
        per_level = [h * w for h, w in feats]
        outputs = {
            "cls_logits": raw[..., :k],
            "bbox_regression": raw[..., k : k + 4],
            "bbox_ctrness": raw[..., k + 4 :],
        }
        split = {key: list(v.split(per_level, dim=1)) for key, v in outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return det.postprocess_detections(split, split_anchors, images.image_sizes)

    def _level_shapes(self) -> list[tuple[int, int]]:
        grid = self.backbone.patch_embed.grid_size
        return [(int(grid[0] * s), int(grid[1] * s)) for s in self.config.scales]


class RawOutputs(nn.Module):
    """Base of a detector's graph module: holds the detector under its own name (so recorded
    transforms such as quantization still find their modules) and the run's manifest and input."""

    def __init__(self, attr: str, detector: nn.Module, model: nn.Module):
        super().__init__()
        setattr(self, attr, detector)
        self.pretrained_cfg = model.pretrained_cfg
        manifest = get_manifest(model)
        if manifest is not None:
            set_manifest(self, manifest)


class RawDetectorOutputs(RawOutputs):
    """(B, C, H, W) images -> (B, A, K + 5): per anchor (the pyramid's cells, finest level first, row
    by row) K class logits, 4 box-regression values (FCOS's linear coder, normalised by the anchor
    size) and 1 centerness logit. Box decoding and NMS are data-dependent and stay outside the graph
    (:meth:`DetectionModel.decode`)."""

    def __init__(self, model: DetectionModel):
        super().__init__("detector", model.detector, model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.detector.head(list(self.detector.backbone(images).values()))
        return torch.cat([out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]], dim=-1)


def attach_detection_head(model: nn.Module, config: DenseHeadConfig) -> DetectionModel:
    """Wrap a plain ViT (no classifier) into the FCOS detector; the manifest moves to the wrapper."""
    return wrap_in_head(model, config, DetectionModel)

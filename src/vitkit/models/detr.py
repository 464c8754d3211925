"""A DETR-family detector over a plain timm ViT: Hugging Face transformers' Deformable DETR (Zhu et
al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR 2021), fed by
ViTDet's simple feature pyramid (``models/dense.py``'s :class:`FeaturePyramid`).

Why transformers' Deformable DETR (issue 20 names it): maintained, built from a config without any
download, its multi-scale deformable attention has a pure-PyTorch ``grid_sample`` path
(``disable_custom_kernels=True``), and its loss (Hungarian matching with class 2 / L1 5 / GIoU 2
costs, sigmoid focal classification, auxiliary decoder losses) is the one Co-DETR builds on.

How the ViT gets in, without touching transformers' code: transformers builds a backbone through
``AutoBackbone.from_config``; vitkit registers a placeholder backbone type (``vitkit-vit``) whose
only job is to report the pyramid's channels, so that transformers sizes its input projections for
them, and then sets the ViT-with-pyramid module (:class:`ViTBackbone`) as that backbone. A fresh
model uses the library's own initialisation for everything but the ViT.

Scaled-down defaults (the paper's are for COCO on a ResNet-50): ``d_model`` = the pyramid's
channels, 2 encoder + 2 decoder layers, FFN 2 x d_model, ``channels // 32`` heads, 4 sampling points,
``queries`` 50 (the canvases hold at most a handful of items), the pyramid's levels as the feature
levels. Detections: the 100 best (query, class) pairs by sigmoid score, as transformers'
``post_process_object_detection`` picks them, scores >= 0.05 kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitkit.models.dense import DenseHeadConfig, prefixed_group_matcher, wrap_in_head
from vitkit.models.detection import RawOutputs, ViTPyramid
from vitkit.models.factory import model_input_size

SCORE_THRESHOLD = 0.05
DETECTIONS_PER_IMAGE = 100
_PLACEHOLDER = "vitkit-vit"


def _quiet_import() -> None:
    """transformers imports torchao, whose enum registrations make torch log two 'W...' lines per
    process that say nothing to a vitkit user; that logger alone is silenced."""
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _register_placeholder() -> None:
    """The backbone type transformers builds before vitkit puts the ViT in (registered once)."""
    _quiet_import()
    from transformers import AutoBackbone, AutoConfig, PretrainedConfig, PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if _PLACEHOLDER in CONFIG_MAPPING:
        return

    class VitkitBackboneConfig(PretrainedConfig):
        model_type = _PLACEHOLDER

        def __init__(self, channels: list[int] | None = None, **kwargs):
            super().__init__(**kwargs)
            self.channels = list(channels or [])

    class VitkitPlaceholderBackbone(PreTrainedModel):
        config_class = VitkitBackboneConfig
        main_input_name = "pixel_values"

        def __init__(self, config):
            super().__init__(config)
            self.channels = list(config.channels)

        def forward(self, pixel_values, **kwargs):  # pragma: no cover - replaced before any call
            raise RuntimeError("vitkit's placeholder backbone is replaced by the ViT before use")

    AutoConfig.register(_PLACEHOLDER, VitkitBackboneConfig)
    AutoBackbone.register(VitkitBackboneConfig, VitkitPlaceholderBackbone)


class ViTBackbone(ViTPyramid):
    """The ViT's chosen block(s) -> the simple feature pyramid, as transformers' backbones answer:
    a list of (B, channels, h, w) maps, finest first."""

    def __init__(self, vit: nn.Module, config: DenseHeadConfig):
        super().__init__(vit, config)
        self.channels = [config.channels] * len(config.scales)

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> list[torch.Tensor]:  # type: ignore[override]
        return self.maps(pixel_values)


def detr_config(config: DenseHeadConfig):
    """transformers' ``DeformableDetrConfig`` for a vitkit head config (see the module docstring)."""
    _register_placeholder()
    from transformers import DeformableDetrConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = config.channels
    levels = len(config.scales)
    return DeformableDetrConfig(
        backbone_config=CONFIG_MAPPING[_PLACEHOLDER](channels=[d] * levels),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_labels=config.num_classes,
        num_queries=config.queries,
        d_model=d,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=2 * d,
        decoder_ffn_dim=2 * d,
        encoder_attention_heads=max(1, d // 32),
        decoder_attention_heads=max(1, d // 32),
        num_feature_levels=levels,
        encoder_n_points=4,
        decoder_n_points=4,
        auxiliary_loss=True,
        disable_custom_kernels=True,
    )


class DetrDetectionModel(nn.Module):
    """(B, C, H, W) normalised images -> per image ``{"boxes" (k, 4) xyxy in input pixels, "scores",
    "labels"}`` (eval), or the DETR loss dict when given targets in training mode (the same
    interface as :class:`vitkit.models.detection.DetectionModel`)."""

    def __init__(self, vit: nn.Module, config: DenseHeadConfig):
        super().__init__()
        _quiet_import()
        from transformers import DeformableDetrForObjectDetection

        c, h, w = model_input_size(vit)
        self.config = config
        self.num_classes = config.num_classes
        self.detr = DeformableDetrForObjectDetection(detr_config(config))
        # the documented backbone slot of transformers' conv encoder: the ViT and its pyramid go in
        self.detr.model.backbone.model = ViTBackbone(vit, config)
        self.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", {}) or {})
        self.pretrained_cfg["input_size"] = (c, h, w)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 0))

    @property
    def backbone(self) -> nn.Module:
        return self.detr.model.backbone.model.vit

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return prefixed_group_matcher(self.backbone, "detr.model.backbone.model.vit.", coarse)

    def no_weight_decay(self) -> set[str]:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"detr.model.backbone.model.vit.{n}" for n in inner}

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """(B, Q, K + 4): per query, K class logits and the box (cx, cy, w, h) as fractions of the image."""
        out = self.detr(pixel_values=images)
        return torch.cat([out.logits, out.pred_boxes], dim=-1)

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training and targets is not None:
            out = self.detr(pixel_values=images, labels=self.detr_labels(images, targets))
            return {"detr": out.loss}
        return self.decode(self.raw(images))

    @staticmethod
    def detr_labels(
        images: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """vitkit's targets (xyxy boxes in input pixels) as transformers' DETR labels (cx, cy, w, h
        as fractions of the image)."""
        h, w = images.shape[-2:]
        scale = images.new_tensor([w, h, w, h])
        from torchvision.ops import box_convert

        return [
            {"class_labels": t["labels"], "boxes": box_convert(t["boxes"] / scale, "xyxy", "cxcywh")}
            for t in targets
        ]

    def export_module(self) -> nn.Module:
        return RawDetrOutputs(self)

    @torch.no_grad()
    def decode(self, raw: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections from raw outputs (B, Q, K + 4): the best (query, class) pairs by sigmoid
        score (transformers' ``post_process_object_detection``), boxes in input pixels."""
        k = self.num_classes
        _, h, w = self.pretrained_cfg["input_size"]
        logits, boxes = raw[..., :k].float(), raw[..., k:].float()
        prob = logits.sigmoid().flatten(1)
        n = min(DETECTIONS_PER_IMAGE, prob.shape[1])
        scores, index = prob.topk(n, dim=1)
        query, labels = torch.div(index, k, rounding_mode="floor"), index % k
        cx, cy, bw, bh = boxes.unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * boxes.new_tensor(
            [w, h, w, h]
        )
        out = []
        for i in range(raw.shape[0]):
            keep = scores[i] >= SCORE_THRESHOLD
            out.append(
                {"boxes": xyxy[i, query[i]][keep], "scores": scores[i][keep], "labels": labels[i][keep]}
            )
        return out


class RawDetrOutputs(RawOutputs):
    """(B, C, H, W) images -> (B, Q, K + 4) raw DETR outputs (no post-processing in the graph; DETR
    needs no NMS: :meth:`DetrDetectionModel.decode` is a top-k)."""

    def __init__(self, model: DetrDetectionModel):
        super().__init__("detr", model.detr, model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.detr(pixel_values=images)
        return torch.cat([out.logits, out.pred_boxes], dim=-1)


def attach_detr_head(model: nn.Module, config: DenseHeadConfig) -> DetrDetectionModel:
    """Wrap a plain ViT (no classifier) into Deformable DETR; the manifest moves to the wrapper."""
    return wrap_in_head(model, config, DetrDetectionModel)

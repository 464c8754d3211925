"""The task head a manifest records, whichever module builds it: the one-stage heads of
``models/dense.py`` (linear, UperNet, change heads), ViT-P's two stages (``models/vitp.py``) or the
FCOS detector (``models/detection.py``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitkit.models.dense import DenseHeadConfig, attach_dense_head, validated_head_config
from vitkit.models.detection import attach_detection_head
from vitkit.models.detr import attach_detr_head
from vitkit.models.vitp import attach_vitp_head


def attach_head(model: nn.Module, config: DenseHeadConfig | dict[str, Any]) -> nn.Module:
    """Wrap a plain ViT into the dense model ``config`` describes (structure only for ViT-P's stage 1:
    its weights come with the run's)."""
    config = validated_head_config(config, "model.json 'head'")
    if config.head == "vitp":
        return attach_vitp_head(model, config)
    if config.head == "fcos":
        return attach_detection_head(model, config)
    if config.head == "deformable-detr":
        return attach_detr_head(model, config)
    return attach_dense_head(model, config)


def export_refusal(config: DenseHeadConfig | dict[str, Any] | None) -> str | None:
    """Why a model with this head has no ONNX graph, or None when it exports."""
    if config is None:
        return None
    head = config.head if isinstance(config, DenseHeadConfig) else config.get("head")
    if head == "vitp":
        return (
            "ViT-P's two-stage inference (connected regions of stage 1's label map, then ViT passes over "
            "chunks of points, per image) is data-dependent and has no single ONNX graph; export the "
            "stage-1 segmentation run it was fine-tuned from"
        )
    return None


def export_parity_bound(config: DenseHeadConfig | dict[str, Any] | None) -> float | None:
    """A looser ONNX parity bound a head needs, or None for the default: Deformable DETR's
    ``grid_sample`` sampling and its sigmoid / inverse-sigmoid reference points differ from
    onnxruntime's by up to ~1e-4 in float32 (7.6e-5 seen on a 32 px canvas run)."""
    if config is None:
        return None
    head = config.head if isinstance(config, DenseHeadConfig) else config.get("head")
    return 1e-3 if head == "deformable-detr" else None

"""The task head a manifest records, whichever module builds it: the one-stage heads of
``models/dense.py`` (linear, UperNet, change heads), ViT-P's two stages (``models/vitp.py``) or the
FCOS detector (``models/detection.py``), Deformable DETR (``models/detr.py``) and Co-DETR
(``models/codetr.py``), and the text tower of an image-text model (``models/imagetext.py``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitkit.models.codetr import attach_codetr_head
from vitkit.models.dense import QUERY_HEADS, DenseHeadConfig, attach_dense_head, validated_head_config
from vitkit.models.detection import attach_detection_head
from vitkit.models.detr import attach_detr_head
from vitkit.models.imagetext import attach_clip_head
from vitkit.models.vitp import attach_vitp_head


def attach_head(model: nn.Module, config: DenseHeadConfig | dict[str, Any]) -> nn.Module:
    """Wrap a plain ViT into the dense model ``config`` describes (structure only for ViT-P's stage 1:
    its weights come with the run's), or into an image-text model (``head: clip``)."""
    if isinstance(config, dict) and config.get("head") == "clip":
        return attach_clip_head(model, config)
    config = validated_head_config(config, "model.json 'head'")
    if config.head == "vitp":
        return attach_vitp_head(model, config)
    if config.head == "fcos":
        return attach_detection_head(model, config)
    if config.head == "deformable-detr":
        return attach_detr_head(model, config)
    if config.head == "co-detr":
        return attach_codetr_head(model, config)
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
    """A looser ONNX parity bound a head needs, or None for the default: the DETRs' deformable
    attention (``grid_sample`` at sigmoid / inverse-sigmoid reference points) comes out of
    onnxruntime up to ~1e-3 away from PyTorch in float32 (7.6e-5 on a 32 px DETR test run, 6e-4 to
    1.04e-3 on the class logits of short Co-DETR runs, 3e-6 on their boxes), while float32 PyTorch
    agrees with float64 PyTorch to 2e-7: the gap is onnxruntime's kernels', not the model's
    sensitivity. The decoded detections stay equal (tests/tasks/test_detection.py)."""
    if config is None:
        return None
    head = config.head if isinstance(config, DenseHeadConfig) else config.get("head")
    return 5e-3 if head in QUERY_HEADS else None

"""Quantization as a model transform: ``quantize(model, calib_data, config)``.

What changes in the model: every quantization point (``points.py``) is swapped by type for its
quantized layer; the transform is recorded in the manifest as ``quantize`` with the config (incl. the
``{module pattern: bits}`` map) and the resolved per-layer bits, so ``vitkit.load`` rebuilds the
structure (``replay_quantization``) and reloads calibrated scales, reparameterized LayerNorm/Linear
weights and reconstructed weights from ``model.safetensors``. It composes with earlier transforms
(LoRA merged, pruned, token-reduced models): it only looks at the module types it finds. On a ToMe
model the calibration runs each block on its captured input tokens on its own, so without the
token sizes of earlier merges (size 1, no proportional-attention bias, see
``vitkit.compress.tokens.tome.ToMeState``); the quantized model itself merges exactly as ToMe does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vitkit.compress.quant.calibrate import (
    CalibrationReport,
    calibrate_model,
    fold_gelu_shifts,
    reconstruct_blocks,
)
from vitkit.compress.quant.config import QuantConfig, make_config
from vitkit.compress.quant.points import build_structure
from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import get_manifest, model_input_size, record_transform
from vitkit.registry import Approximate, Technique, prepare_with, register

TRANSFORM_NAME = "quantize"
REPORT_ATTR = "vitkit_quant_report"


def calibration_images(model: nn.Module, data: ImageDataset | torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``cfg.calib_size`` normalized images at the model's input size (a seeded random subset)."""
    c, h, w = model_input_size(model)
    if isinstance(data, ImageDataset):
        n = len(data)
    elif isinstance(data, torch.Tensor):
        if data.ndim != 4 or tuple(data.shape[1:]) != (c, h, w):
            raise VitkitError(
                f"calibration images have shape {tuple(data.shape[1:])} but the model expects {(c, h, w)} "
                "(normalized float images, N x C x H x W)"
            )
        n = len(data)
    else:
        raise VitkitError(
            f"calibration data must be an ImageDataset or an image tensor, got {type(data).__name__}"
        )
    if n < cfg.calib_batch:
        raise VitkitError(
            f"the calibration set has {n} images, fewer than one calibration batch (calib_batch={cfg.calib_batch}): "
            "give more images or lower calib_batch"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(n, generator=g)[: min(cfg.calib_size, n)]
    if isinstance(data, torch.Tensor):
        return data[idx].float()
    from vitkit.train.evaluate import eval_transform

    return eval_transform(model, pair=data.pair).images(data.images[idx])


def apply_quantization(model: nn.Module, config: QuantConfig | dict[str, Any]) -> nn.Module:
    """The quantized *structure* (uncalibrated quantizers) recorded in the manifest. Used by replay;
    to quantize for real call :func:`quantize`, which also calibrates."""
    cfg = make_config(config)
    resolved = build_structure(model, cfg)
    _record(model, cfg, resolved)
    return model


def replay_quantization(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Registry replay: rebuild the structure from the recorded config (values come from safetensors)."""
    config = dict(config)
    recorded = config.pop("resolved_bits", None)
    cfg = make_config(config)
    resolved = build_structure(model, cfg, only=set(recorded) if recorded is not None else None)
    if recorded is not None and recorded != resolved:
        missing = sorted(set(recorded) ^ set(resolved))[:3]
        raise VitkitError(
            f"the run's quantization points differ from the rebuilt model's (e.g. {missing}): "
            "was the model changed after it was quantized?"
        )
    _record(model, cfg, resolved)
    return model


def _record(model: nn.Module, cfg: QuantConfig, resolved: dict) -> None:
    if get_manifest(model) is not None:
        record_transform(model, TRANSFORM_NAME, {**cfg.model_dump(), "resolved_bits": resolved})


def _refuse_unsupported_transforms(model: nn.Module) -> None:
    """One line for the first transform whose registration says quantization cannot follow it."""
    from vitkit.models import get_manifest
    from vitkit.registry import technique

    manifest = get_manifest(model)
    for t in manifest.transforms if manifest is not None else []:
        reason = technique(t.name).quantize
        if reason:
            raise VitkitError(f"cannot quantize a model with transform '{t.name}': {reason}")


@contextlib.contextmanager
def _exit_heads_running(model: nn.Module) -> Iterator[None]:
    """LGViT exit heads run only while someone listens; calibration must see them run, or their
    quantization points stay uncalibrated (they run when the exits are evaluated or exported)."""
    from vitkit.compress.exits import exit_blocks

    blocks = exit_blocks(model)
    for blk in blocks:
        blk._listeners[id(model)] = lambda *_: None
    try:
        yield
    finally:
        for blk in blocks:
            blk._listeners.pop(id(model), None)


def quantize(
    model: nn.Module,
    calib_data: ImageDataset | torch.Tensor,
    config: QuantConfig | dict[str, Any] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Post-training quantization of ``model`` in place (returns it, in eval mode).

    ``calib_data``: an :class:`~vitkit.data.ImageDataset` (uint8, transformed with the model's eval
    transform) or normalized float images (N, C, H, W) at the model's input size. ``config``: a
    :class:`QuantConfig`, a dict, or keyword fields (``method="adalog", w_bits=4, a_bits=4``).
    The calibration report (timings, reparameterized layers) is ``model.vitkit_quant_report``.
    """
    cfg = make_config(config, **overrides)
    _refuse_unsupported_transforms(model)
    images = calibration_images(model, calib_data, cfg)
    model.eval()
    t0 = time.perf_counter()
    if cfg.mixed_precision is not None and not cfg.layer_bits:
        from vitkit.compress.quant.mixed import mixed_precision_bits

        bits = mixed_precision_bits(model, images, cfg.avg_bits, cfg.bit_choices, cfg.mixed_precision)
        cfg = make_config(cfg, layer_bits=bits)  # the allocation is data: recorded, replayed as is
    resolved = build_structure(model, cfg)
    with _exit_heads_running(model):
        report: CalibrationReport = calibrate_model(model, images, cfg)
        if cfg.spec.integer_ops:
            from vitkit.compress.quant.intonly import calibrate_integer_ops

            calibrate_integer_ops(model, images, cfg.calib_batch)
        if cfg.reconstruct:
            reconstruct_blocks(model, images, cfg, report)
    report.folded = fold_gelu_shifts(model)
    report.seconds = time.perf_counter() - t0 - report.reconstruction_seconds
    _record(model, cfg, resolved)
    object.__setattr__(model, REPORT_ATTR, report)
    return model


def prepare_int8_export(model: nn.Module) -> nn.Module:
    """Export preparation for ``vitkit export`` (the ``quantize`` rule in ``vitkit.deploy.export``).

    Every 8-bit uniform quantizer of ``model`` (a deep copy made by the exporter) emits torch's
    fake-quantize op with its calibrated scale and zero point, which the ONNX exporter writes as a
    QuantizeLinear/DequantizeLinear pair: the graph is the real INT8 model onnxruntime runs with
    integer kernels (see :mod:`vitkit.deploy.qdq`). A quantizer without an INT8 form in
    onnxruntime (log2, twin, AdaLog, ..., or another bit-width) stops the export with its name.
    """
    from vitkit.compress.quant.quantizers import UniformQuantizer, int8_blockers

    blockers = int8_blockers(model)
    if blockers:
        raise VitkitError(
            f"transform 'quantize' is not exportable: quantizer {blockers[0]} (and {len(blockers) - 1} more) "
            "has no INT8 form in onnxruntime; only 8-bit uniform quantizers export as QuantizeLinear/"
            "DequantizeLinear (vitkit quantize RUN --preset w8a8 with --method minmax, percentile or omse)"
        )
    for q in model.modules():
        if isinstance(q, UniformQuantizer):
            q.export_qdq = True  # an instance attribute on the copy: the run's model stays simulated
    return model


register(
    Technique(
        name=TRANSFORM_NAME,
        summary="simulated quantization of weights and activations (uniform, log2, mixed precision)",
        paper="",  # one transform for several papers' quantizers: each method module cites its own
        config=QuantConfig,
        replay=replay_quantization,
        # Exported as the real INT8 graph (QuantizeLinear/DequantizeLinear at every calibrated point;
        # onnxruntime runs them as integer kernels). Measured on trained vitkit_micro_p4_16 W8A8 minmax
        # runs, 359 digits val images: max logit diff 0.028 (plain), 0.022 (ToMe r=2), top-1 agreement
        # 100%. EViT + W8A8 exceeds the bound (1.4: INT8 rounding flips the kept tokens of 10 images;
        # agreement 99.2%): export it with an explicit --bound if that is acceptable.
        export=prepare_with(
            prepare_int8_export,
            parity=Approximate(
                max_abs_logit_diff=0.25,
                min_top1_agreement=0.98,
                why="onnxruntime's INT8 kernels round and accumulate in integers where the simulated "
                "quantizers compute in float",
            ),
        ),
        family="compress",
        verb="vitkit quantize RUN --preset w8a8",
    )
)

"""Export a run directory to ONNX: the per-transform export contract, parity on the run's own images.

The contract (docs/architecture.md, "Export"): every transform a run's manifest can name declares how
it exports in its registration (``vitkit.registry.Technique.export``):

- ``AS_IS``: the transformed module graph traces as it is (prompt tokens, pruned shapes, ...);
- ``prepare_with("pkg.module:function")``: ``function(model) -> model`` turns the model into its
  deployable form first (LoRA merged into the base weights, EWA experts averaged, ...);
- ``not_exportable("reason")``: export stops with one line naming the transform and the reason;
- ``prepare_with(..., parity=Approximate(...))``: the deployable form is a deliberate approximation
  (the simulated quantizers become real INT8 QDQ ops): parity is then a stated logit bound plus a
  minimum top-1 agreement with PyTorch, both measured and recorded, instead of float round-off.

A transform that is not registered also stops the export with one line: nothing is exported on
trust. Whatever the rules say, the exported graph is then checked against PyTorch on real images of
the run's validation data (max |logit difference| against a stated bound): a rule that is wrong
cannot produce a silently different model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.errors import VitkitError

# the vocabulary of export rules, re-exported (techniques declare theirs in their registration)
from vitkit.registry import (  # noqa: F401
    AS_IS,
    Approximate,
    ExportRule,
    PrepareFn,
    not_exportable,
    prepare_with,
    register,
    technique,
)

DEFAULT_BOUND = 1e-4  # max |logit diff| of a graph that computes the same function (float round-off)
ONNX_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
EXPORT_JSON = "export.json"


def register_export_rule(name: str, rule: ExportRule) -> None:
    """Change how runs with transform ``name`` export (tests; techniques declare ``export=`` in their
    registration instead)."""
    register(dataclasses.replace(technique(name), export=rule))


def export_rule(name: str) -> ExportRule:
    """The export rule transform ``name`` registered; raises one line if it refuses export."""
    rule = technique(name).export
    if rule.not_exportable:
        raise VitkitError(f"transform '{name}' is not exportable: {rule.not_exportable}")
    return rule


def pending_prepares(transform_names: list[str]) -> list[str]:
    """The transforms whose prepare hook export runs: declared, and not settled by a later transform."""
    out = []
    for i, name in enumerate(transform_names):
        rule = export_rule(name)
        if rule.prepare is not None and rule.settled_by not in transform_names[i + 1 :]:
            out.append(name)
    return out


def check_exportable(transform_names: list[str]) -> None:
    """Raise one line for the first transform that cannot be exported."""
    for name in transform_names:
        export_rule(name)
    if "quantize" in transform_names:
        first = transform_names.index("quantize")
        for name in pending_prepares(transform_names[:first]):
            raise VitkitError(
                f"transform '{name}' is not exportable after quantization: its export step "
                f"({technique(name).export.prepare}) would rewrite weights that 'quantize' calibrated as they "
                "were, so the INT8 graph would not be the run's model; apply that step before quantizing"
            )


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A deployable copy of ``model``: every recorded transform's prepare hook applied, in order."""
    from vitkit.models import get_manifest

    manifest = get_manifest(model)
    names = [t.name for t in manifest.transforms] if manifest is not None else []
    check_exportable(names)
    out = copy.deepcopy(model).eval()
    done: set[str | Callable] = set()
    for name in pending_prepares(names):
        rule = technique(name).export
        if rule.prepare not in done:  # one merge folds all LoRA kinds
            out = rule.resolve()(out)
            done.add(rule.prepare)
    return out.eval()


def top1(logits: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Top-1 accuracy of ``logits``, or None for multi-hot targets or per-pixel outputs."""
    if targets.ndim != 1 or logits.ndim != 2:
        return None
    return float((logits.argmax(1) == targets).float().mean())


INTEGER_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
)


def integer_ops(path: Path) -> dict[str, int]:
    """How many nodes of each integer (INT8) op type the ONNX graph at ``path`` holds."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in INTEGER_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def exit_onnx_name(blocks_before: int) -> str:
    return f"model.exit{blocks_before}.onnx"


def export_exits(
    model: nn.Module,
    run: Path,
    input_shape: tuple[int, int, int],
    dataset,
    exporter: str,
    logits_of: Callable[[Path], torch.Tensor],
    bound: float,
) -> list[dict[str, Any]]:
    """One ONNX graph per LGViT exit (the backbone up to the exit's block + its head), each checked
    against the exit logits PyTorch computes inside the full model on the same images. A graph above
    ``bound`` removes every file this export wrote (the full-path graph included) and fails."""
    from vitkit.compress.exits import ExitPath, all_exit_logits, exit_blocks
    from vitkit.deploy.onnx import export_onnx

    _, ref_per_exit = all_exit_logits(model, dataset)
    rows: list[dict[str, Any]] = []
    written: list[Path] = [run / ONNX_NAME]
    try:
        for blk in exit_blocks(model):
            k = blk.blocks_before
            path = run / exit_onnx_name(k)
            export_onnx(ExitPath(model, k).eval(), path, input_shape, exporter=exporter)
            written.append(path)
            ref, got = ref_per_exit[k], logits_of(path)
            diff = float((ref - got).abs().max())
            if not diff <= bound:
                raise VitkitError(
                    f"{path}: exit after {k} blocks: onnxruntime logits differ from PyTorch by {diff:.2e} on "
                    f"{len(dataset)} images of {dataset.name} (bound {bound:.0e}); the export was removed"
                )
            rows.append({
                "blocks": k,
                "head": blk.exit_head.kind,
                "file": path.name,
                "max_abs_logit_diff": diff,
                "bound": bound,
                "top1_pytorch": top1(ref, dataset.targets),
                "top1_onnx": top1(got, dataset.targets),
                "size_bytes": path.stat().st_size,
            })  # fmt: skip
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return rows


def quantize_dynamic(
    src: Path, dst: Path, logits_of: Callable[[Path], torch.Tensor], ref: torch.Tensor, dataset
) -> dict[str, Any]:
    """onnxruntime's dynamic quantization (INT8 weights, activations quantized per batch at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vitkit.io import atomic_path

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime logs a "consider pre-processing" advice on every call
    try:
        with atomic_path(dst) as tmp:
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    got = logits_of(dst)
    return {
        "file": INT8_NAME,
        "method": "onnxruntime quantize_dynamic (QInt8 weights, dynamic activations)",
        "max_abs_logit_diff": float((ref - got).abs().max()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).float().mean()),
        "top1": top1(got, dataset.targets),
        "size_bytes": dst.stat().st_size,
    }

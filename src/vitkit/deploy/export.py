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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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


# -- exporting a run --------------------------------------------------------------------------------
@dataclass
class RunExport:
    path: Path
    doc: dict[str, Any]


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float | None:
    if targets.ndim != 1:
        return None
    return float((logits.argmax(1) == targets).float().mean())


def export_run(
    run_dir: str | os.PathLike,
    *,
    fmt: str = "onnx",
    exporter: str = "torchscript",
    opt_level: str = "all",
    threads: int | None = None,
    int8: str | None = None,
    images: int = 256,
    bound: float | None = None,
    int8_agreement: float = 0.9,
    data: str | None = None,
) -> RunExport:
    """Write ``RUN/model.onnx`` (and ``model.int8.onnx`` with ``int8="dynamic"``) and ``export.json``.

    A run with LGViT exits also gets ``model.exit{k}.onnx`` per exit (the backbone up to block k and
    that exit's head), each with its own parity check, listed under ``"exits"`` in ``export.json``.

    Parity: max |logit difference| between PyTorch (the run's model as ``vitkit.load`` gives it) and
    onnxruntime on up to ``images`` real images of the run's validation split; above ``bound`` (default
    1e-4) the export fails (nothing is left behind). A run whose transforms export approximately (a
    quantized run: the real INT8 graph) is held to its rule's bound and to a minimum top-1 agreement
    with PyTorch instead, both recorded. The ``int8="dynamic"`` graph is an approximation: its logit
    difference is reported, and it fails when its top-1 agreement falls below ``int8_agreement``.
    """
    from vitkit.api import evaluation_data
    from vitkit.deploy.onnx import OnnxModel, export_onnx
    from vitkit.io import write_json
    from vitkit.models import model_input_size
    from vitkit.runs import load, read_run
    from vitkit.train.evaluate import predict

    if fmt != "onnx":
        raise VitkitError(f"--format must be 'onnx', got '{fmt}'")
    if int8 not in (None, "dynamic"):
        raise VitkitError(f"--int8 must be 'dynamic', got '{int8}'")
    if images < 1:
        raise VitkitError("--images must be positive")
    info = read_run(run_dir)  # a clear line for a missing/unfinished run before anything heavy
    names = [t.name for t in info.manifest.transforms]
    check_exportable(names)
    approx = [r.parity for r in (technique(n).export for n in names) if r.parity is not None]
    if int8 and "quantize" in names:
        raise VitkitError(
            "--int8 dynamic: this run is quantized and exports as its own INT8 graph (model.onnx); drop --int8"
        )
    if bound is None:
        bound = max((a.max_abs_logit_diff for a in approx), default=DEFAULT_BOUND)
    min_agreement = max((a.min_top1_agreement for a in approx), default=None)
    model = load(run_dir)
    deployable = prepare_for_export(model)
    input_shape = model_input_size(deployable)
    dataset = evaluation_data(info, data, input_shape[1])
    dataset = dataset.subset(torch.arange(min(images, len(dataset))))
    if threads:
        torch.set_num_threads(threads)
    ref = predict(model, dataset)  # the run's own model: the parity check also covers the prepare hooks

    onnx_path = info.path / ONNX_NAME
    t0 = time.perf_counter()
    result = export_onnx(deployable, onnx_path, input_shape, exporter=exporter)
    export_seconds = time.perf_counter() - t0

    def onnx_logits(path: Path) -> torch.Tensor:
        session = OnnxModel(path, threads=threads, optimization=opt_level)
        return predict(deployable, dataset, forward=lambda _m, x: session(x))

    got = onnx_logits(onnx_path)
    diff = float((ref - got).abs().max())
    agreement = float((ref.argmax(1) == got.argmax(1)).float().mean())
    if not diff <= bound:
        onnx_path.unlink(missing_ok=True)
        raise VitkitError(
            f"{onnx_path}: onnxruntime logits differ from PyTorch by {diff:.2e} on {len(dataset)} "
            f"images of {dataset.name} (bound {bound:.0e}); the export was removed"
        )
    if min_agreement is not None and agreement < min_agreement:
        onnx_path.unlink(missing_ok=True)
        raise VitkitError(
            f"{onnx_path}: onnxruntime agrees with PyTorch on only {agreement:.1%} of top-1 predictions on "
            f"{len(dataset)} images of {dataset.name} (bound {min_agreement:.0%}); the export was removed"
        )
    int8_ops = integer_ops(onnx_path) if "quantize" in names else None
    if int8_ops is not None and not int8_ops:
        onnx_path.unlink(missing_ok=True)
        raise VitkitError(
            f"{onnx_path}: the quantized run exported without any integer op; the export was removed"
        )
    doc: dict[str, Any] = {
        "run": str(info.path),
        "format": "onnx",
        "file": ONNX_NAME,
        "exporter": exporter,
        "opset": result.opset,
        "dynamic_batch": True,
        "input_shape": list(input_shape),
        "transforms": [t.name for t in info.manifest.transforms],
        "prepared": pending_prepares(names),
        "ort_optimization": opt_level,
        "threads": threads,
        "parity_data": dataset.name,
        "parity_images": len(dataset),
        "max_abs_logit_diff": diff,
        "bound": bound,
        "top1_agreement": agreement,
        "top1_pytorch": _accuracy(ref, dataset.targets),
        "top1_onnx": _accuracy(got, dataset.targets),
        "size_bytes": onnx_path.stat().st_size,
        "export_seconds": export_seconds,
    }
    if approx:
        doc["approximate"] = {"min_top1_agreement": min_agreement, "why": [a.why for a in approx]}
    if int8_ops is not None:
        doc["int8_ops"] = int8_ops
    if "exits" in doc["transforms"]:
        doc["exits"] = _export_exits(
            deployable, info.path, input_shape, dataset, exporter, onnx_logits, bound
        )
    if int8:
        doc["int8"] = _quantize_dynamic(onnx_path, info.path / INT8_NAME, onnx_logits, ref, dataset)
        if doc["int8"]["top1_agreement"] < int8_agreement:
            (info.path / INT8_NAME).unlink(missing_ok=True)
            raise VitkitError(
                f"{info.path / INT8_NAME}: dynamic INT8 agrees with PyTorch on only "
                f"{doc['int8']['top1_agreement']:.1%} of top-1 predictions (bound {int8_agreement:.0%}); removed"
            )
    write_json(info.path / EXPORT_JSON, doc)
    return RunExport(onnx_path, doc)


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


def _export_exits(
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
                "top1_pytorch": _accuracy(ref, dataset.targets),
                "top1_onnx": _accuracy(got, dataset.targets),
                "size_bytes": path.stat().st_size,
            })  # fmt: skip
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return rows


def _quantize_dynamic(
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
        "top1": _accuracy(got, dataset.targets),
        "size_bytes": dst.stat().st_size,
    }

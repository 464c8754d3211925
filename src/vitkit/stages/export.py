"""``vitkit export``: a run directory to ONNX, checked against PyTorch on the run's own images.

How each transform exports is its registration's export rule (:mod:`vitkit.deploy.export`, the
contract); this stage applies the rules, writes ``RUN/model.onnx`` (and the dynamic INT8 graph, one
graph per LGViT exit), checks parity and records it all in ``RUN/export.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitkit.deploy.export import (
    DEFAULT_BOUND,
    EXPORT_JSON,
    INT8_NAME,
    ONNX_NAME,
    check_exportable,
    export_exits,
    integer_ops,
    pending_prepares,
    prepare_for_export,
    quantize_dynamic,
    top1,
)
from vitkit.deploy.onnx import OnnxModel, export_onnx
from vitkit.errors import VitkitError
from vitkit.io import write_json
from vitkit.models import model_input_size
from vitkit.models.heads import export_parity_bound, export_refusal
from vitkit.registry import technique
from vitkit.runs import Run
from vitkit.train.evaluate import predict


@dataclass
class RunExport:
    path: Path
    doc: dict[str, Any]


def export_run(
    run_dir: str | os.PathLike,
    *,
    fmt: str = "onnx",
    exporter: str | None = None,
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

    ``exporter`` None: the model's ``onnx_exporter`` attribute, else torchscript.

    Parity: max |logit difference| between PyTorch (the run's model as ``vitkit.load`` gives it) and
    onnxruntime on up to ``images`` real images of the run's validation split; above ``bound`` (default
    1e-4) the export fails (nothing is left behind). A run whose transforms export approximately (a
    quantized run: the real INT8 graph) is held to its rule's bound and to a minimum top-1 agreement
    with PyTorch instead, both recorded. The ``int8="dynamic"`` graph is an approximation: its logit
    difference is reported, and it fails when its top-1 agreement falls below ``int8_agreement``.
    """
    if fmt != "onnx":
        raise VitkitError(f"--format must be 'onnx', got '{fmt}'")
    if int8 not in (None, "dynamic"):
        raise VitkitError(f"--int8 must be 'dynamic', got '{int8}'")
    if images < 1:
        raise VitkitError("--images must be positive")
    run = Run.open(run_dir)  # a clear line for a missing/unfinished run before anything heavy
    info = run.info
    names = run.transforms
    check_exportable(names)
    refusal = export_refusal(info.manifest.head)
    if refusal:
        raise VitkitError(f"{info.path}: not exportable: {refusal}")
    approx = [r.parity for r in (technique(n).export for n in names) if r.parity is not None]
    if int8 and "quantize" in names:
        raise VitkitError(
            "--int8 dynamic: this run is quantized and exports as its own INT8 graph (model.onnx); drop --int8"
        )
    if bound is None:
        head_bound = export_parity_bound(info.manifest.head) or DEFAULT_BOUND
        bound = max((a.max_abs_logit_diff for a in approx), default=head_bound)
    min_agreement = max((a.min_top1_agreement for a in approx), default=None)
    model = run.model()
    # the model's own choice unless one is asked for: Hyena N-D's FFTs export only through dynamo
    exporter = exporter or getattr(model, "onnx_exporter", "torchscript")
    if hasattr(model, "export_module"):  # the part a graph can hold (a detector's raw outputs, no NMS)
        model = model.export_module()
    deployable = prepare_for_export(model)
    input_shape = model_input_size(deployable)
    dataset = run.eval_data(data, input_shape[1])
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
    # top-1 agreement means something for per-image or per-pixel class scores (argmax over axis 1);
    # a detector's raw per-anchor / per-query outputs (B, A, K + boxes) are held to the bound alone
    agreement = float((ref.argmax(1) == got.argmax(1)).float().mean()) if ref.ndim != 3 else None
    if not diff <= bound:
        onnx_path.unlink(missing_ok=True)
        raise VitkitError(
            f"{onnx_path}: onnxruntime logits differ from PyTorch by {diff:.2e} on {len(dataset)} "
            f"images of {dataset.name} (bound {bound:.0e}); the export was removed"
        )
    if min_agreement is not None and agreement is not None and agreement < min_agreement:
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
        "top1_pytorch": top1(ref, dataset.targets),
        "top1_onnx": top1(got, dataset.targets),
        "size_bytes": onnx_path.stat().st_size,
        "export_seconds": export_seconds,
    }
    if approx:
        doc["approximate"] = {"min_top1_agreement": min_agreement, "why": [a.why for a in approx]}
    if int8_ops is not None:
        doc["int8_ops"] = int8_ops
    if "exits" in doc["transforms"]:
        doc["exits"] = export_exits(deployable, info.path, input_shape, dataset, exporter, onnx_logits, bound)
    if int8:
        doc["int8"] = quantize_dynamic(onnx_path, info.path / INT8_NAME, onnx_logits, ref, dataset)
        if doc["int8"]["top1_agreement"] < int8_agreement:
            (info.path / INT8_NAME).unlink(missing_ok=True)
            raise VitkitError(
                f"{info.path / INT8_NAME}: dynamic INT8 agrees with PyTorch on only "
                f"{doc['int8']['top1_agreement']:.1%} of top-1 predictions (bound {int8_agreement:.0%}); removed"
            )
    write_json(info.path / EXPORT_JSON, doc)
    return RunExport(onnx_path, doc)

"""Quantize a run directory into a new run directory (what ``vitkit quantize`` calls).

Calibration images come from the run's own training split (``config.yaml``), accuracy is measured on
its validation split for the float and the quantized model in the same process. The output is a
normal run (``model.json`` with the ``quantize`` transform in the manifest, ``model.safetensors`` with
the calibrated quantizer buffers, ``config.yaml`` copied so ``vitkit evaluate`` works) plus
``quant.json``: the resolved per-layer bits table, calibration timings and both accuracies. Nothing
is written until quantization and evaluation succeeded.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitkit.compress.quant.config import QuantConfig, make_config
from vitkit.compress.quant.mixed import average_bits, plot_bits
from vitkit.compress.quant.transform import REPORT_ATTR, calibration_images, quantize
from vitkit.deploy.onnx import OnnxModel
from vitkit.deploy.qdq import QDQ_FILE, export_int8_onnx
from vitkit.deploy.x86 import PROGRAM_FILE, compile_int8, int8_kernels, pt2e_int8, save_int8_program
from vitkit.errors import VitkitError
from vitkit.io import check_output
from vitkit.models import get_manifest, model_input_size
from vitkit.runs import CONFIG, Run
from vitkit.stages.common import run_task
from vitkit.train.evaluate import eval_transform, predict
from vitkit.train.precision import bf16_is_fast

QUANT_JSON = "quant.json"
DEPLOY_TARGETS = (None, "onnx", "torch-x86")


def _deploy_onnx(qmodel, val, path: Path) -> dict[str, Any]:
    """Export the INT8 QDQ graph; its top-1 and agreement with the simulated model on ``val``."""

    export_int8_onnx(qmodel, path, model_input_size(qmodel))
    sim = predict(qmodel, val)
    ort_model = OnnxModel(path)
    x = eval_transform(qmodel).images(val.images)
    got = torch.cat([ort_model(x[i : i + 256]) for i in range(0, len(x), 256)])
    return {
        "onnx_int8_top1": float((got.argmax(1) == val.targets).float().mean()),
        "onnx_vs_simulated_agreement": float((got.argmax(1) == sim.argmax(1)).float().mean()),
        "onnx_vs_simulated_max_logit_diff": float((got - sim).abs().max()),
    }


def _deploy_x86(model, qmodel, images, val, path: Path, compile: bool = True) -> dict[str, Any]:
    """PT2E INT8 program calibrated on ``images``: top-1 of its reference graph and of the Inductor-
    compiled graph (the one running oneDNN INT8 kernels), and their agreement with the simulated model."""

    program = pt2e_int8(model.to("cpu"), images)
    sim = predict(qmodel, val).cpu()
    x = eval_transform(qmodel).images(val.images)

    def scores(fn) -> dict[str, float]:
        with torch.no_grad():
            got = torch.cat([fn(x[i : i + 256]) for i in range(0, len(x), 256)])
        return {
            "top1": float((got.argmax(1) == val.targets).float().mean()),
            "agreement": float((got.argmax(1) == sim.argmax(1)).float().mean()),
        }

    ref = scores(program)
    out: dict[str, Any] = {
        "x86_reduce_range": program.meta["vitkit_reduce_range"],
        "x86_reference_top1": ref["top1"],
        "x86_reference_vs_simulated_agreement": ref["agreement"],
    }
    if compile:
        compiled = compile_int8(program)
        try:
            out["x86_int8_kernels"] = int8_kernels(compiled, x[:8])
            comp = scores(compiled)
            out["x86_int8_top1"] = comp["top1"]
            out["x86_vs_simulated_agreement"] = comp["agreement"]
            if bf16_is_fast(torch.device("cpu")):  # int8-mixed-bf16 pays off only with bf16 units
                mixed = scores(compile_int8(program, bf16=True))
                out["x86_int8_mixed_bf16_top1"] = mixed["top1"]
                out["x86_int8_mixed_bf16_vs_simulated_agreement"] = mixed["agreement"]
        except Exception as e:  # Inductor failures vary; keep the reference graph, say why
            out["x86_compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    save_int8_program(program, path, x[:2])
    return out


def quantize_run(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    config: QuantConfig | dict[str, Any] | None = None,
    *,
    force: bool = False,
    device: str = "cpu",
    deploy: str | None = None,
    **overrides: Any,
) -> tuple[dict[str, Any], Path]:
    """Quantize ``run_dir``'s model into the new run ``output``; returns (summary, output path)."""

    cfg = make_config(config, **overrides)
    if deploy not in DEPLOY_TARGETS:
        raise VitkitError(
            f"--deploy must be 'onnx' (onnxruntime INT8 QDQ) or 'torch-x86' (PT2E + Inductor INT8), got '{deploy}'"
        )
    if deploy == "torch-x86" and (
        cfg.w_bits != 8 or cfg.a_bits != 8 or cfg.layer_bits or cfg.mixed_precision
    ):
        raise VitkitError(
            f"--deploy torch-x86 is INT8 only: use --preset w8a8 without mixed precision (got W{cfg.w_bits}A{cfg.a_bits}"
            f"{', layer_bits' if cfg.layer_bits or cfg.mixed_precision else ''})"
        )
    # Before the calibration: a bad output must not cost minutes of work first (the API, not only the CLI).
    check_output(output, "dir", force=force)
    run = Run.open(run_dir)  # model.json, config.yaml, metrics.json and the data: each read once
    if Path(output).resolve() == run.path.resolve():
        raise VitkitError(
            f"-o/--output '{output}' is the source run: write the quantized model to a new directory"
        )
    if run.config is None:
        raise VitkitError(f"run '{run.path}' has no {CONFIG}: cannot find its training data for calibration")
    task = run_task(run.info)
    if task.dense and deploy is not None:
        raise VitkitError(
            f"--deploy {deploy} is for image-level tasks for now; quantize the {task.name} run without it "
            "and export the result with `vitkit export`"
        )
    model = run.model(device)
    splits = run.splits()
    # How good the model is for its task (top1, mIoU, change F1, ...), before and after.
    key = task.quality_key
    # training measured it in fp32 on this validation split (metrics.json says so); else measure it
    fp_value = run.fp32_val_metric(key)
    if fp_value is None:
        fp_value = task.evaluate(model, splits.val, device=device)[key]
    qmodel = quantize(copy.deepcopy(model), splits.train, cfg)
    report = getattr(qmodel, REPORT_ATTR)
    metrics = task.evaluate(qmodel, splits.val, device=device)
    summary = {
        "method": cfg.method,
        "w_bits": cfg.w_bits,
        "a_bits": cfg.a_bits,
        "metric": key,
        f"fp32_{key}": fp_value,
        f"quant_{key}": metrics[key],
        "drop_points": 100 * (fp_value - metrics[key]),
        "calibration_seconds": report.seconds,
        "reconstruction_seconds": report.reconstruction_seconds,
        "calibration_images": report.images,
        "simulated": deploy is None,  # fake quantization in float32 unless an INT8 graph was deployed
    }
    final_cfg = QuantConfig(
        **{k: v for k, v in get_manifest(qmodel).transforms[-1].config.items() if k != "resolved_bits"}
    )
    if final_cfg.layer_bits:
        summary["avg_weight_bits"] = average_bits(final_cfg.layer_bits, model)
    tmp, artifact = None, None
    if deploy == "onnx":
        tmp, artifact = tempfile.TemporaryDirectory(), QDQ_FILE
        summary.update(_deploy_onnx(qmodel, splits.val, Path(tmp.name) / artifact))
    elif deploy == "torch-x86":
        tmp, artifact = tempfile.TemporaryDirectory(), PROGRAM_FILE
        images = calibration_images(model, splits.train, cfg)  # the simulated model's calibration images
        summary.update(_deploy_x86(model, qmodel, images, splits.val, Path(tmp.name) / artifact))
    artifacts: dict[str, Any] = {
        QUANT_JSON: {
            **summary,
            "config": final_cfg.model_dump(),
            "layers": get_manifest(qmodel).transforms[-1].config["resolved_bits"],
            "reparameterized": report.reparameterized,
            "smoothed": report.smoothed,
            "gelu_shift_folded": report.folded,
            "reconstruction_mse": report.reconstruction_mse,
        }
    }
    if tmp is not None:
        artifacts[artifact] = Path(tmp.name) / artifact
    if final_cfg.mixed_precision is not None:
        artifacts["bits.png"] = lambda path: plot_bits(final_cfg.layer_bits, path)
    try:
        out = run.derive(output, qmodel, {**metrics, **summary}, artifacts,
                         extra={"quantized_from": str(run.path)}, force=force)  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()
    return summary, out.path

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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitkit.compress.quant.config import QuantConfig, make_config
from vitkit.compress.quant.transform import REPORT_ATTR, quantize
from vitkit.errors import VitkitError
from vitkit.io import write_json, write_text
from vitkit.models import get_manifest, model_input_size
from vitkit.runs import CONFIG, prepare_run_dir, read_run, save_model, write_metrics

QUANT_JSON = "quant.json"
ONNX_INT8 = "model_int8.onnx"


def _deploy_onnx(qmodel, val, path: Path) -> dict[str, Any]:
    """Export the INT8 QDQ graph; its top-1 and agreement with the simulated model on ``val``."""
    from vitkit.compress.quant.deploy import export_int8_onnx
    from vitkit.deploy.onnx import OnnxModel
    from vitkit.train.evaluate import eval_transform, predict

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
    from vitkit.api import data_splits_for
    from vitkit.runs import load
    from vitkit.train import build_config, evaluate

    cfg = make_config(config, **overrides)
    if deploy not in (None, "onnx"):
        raise VitkitError(f"--deploy must be 'onnx' (onnxruntime INT8 QDQ), got '{deploy}'")
    src = Path(run_dir)
    info = read_run(src)
    if Path(output).resolve() == src.resolve():
        raise VitkitError(
            f"-o/--output '{output}' is the source run: write the quantized model to a new directory"
        )
    if not (src / CONFIG).is_file():
        raise VitkitError(f"run '{src}' has no {CONFIG}: cannot find its training data for calibration")
    train_cfg = build_config(src / CONFIG)
    model = load(src, device=device)
    splits = data_splits_for(train_cfg, model_input_size(model)[1])
    fp_top1 = evaluate(model, splits.val, device=device)["top1"]
    qmodel = quantize(copy.deepcopy(model), splits.train, cfg)
    report = getattr(qmodel, REPORT_ATTR)
    metrics = evaluate(qmodel, splits.val, device=device)
    summary = {
        "method": cfg.method,
        "w_bits": cfg.w_bits,
        "a_bits": cfg.a_bits,
        "fp32_top1": fp_top1,
        "quant_top1": metrics["top1"],
        "drop_points": 100 * (fp_top1 - metrics["top1"]),
        "calibration_seconds": report.seconds,
        "reconstruction_seconds": report.reconstruction_seconds,
        "calibration_images": report.images,
        "simulated": deploy is None,  # fake quantization in float32 unless an INT8 graph was deployed
    }
    final_cfg = QuantConfig(
        **{k: v for k, v in get_manifest(qmodel).transforms[-1].config.items() if k != "resolved_bits"}
    )
    if final_cfg.layer_bits:
        from vitkit.compress.quant.mixed import average_bits

        summary["avg_weight_bits"] = average_bits(final_cfg.layer_bits, model)
    tmp = None
    if deploy == "onnx":
        tmp = tempfile.TemporaryDirectory()
        summary.update(_deploy_onnx(qmodel, splits.val, Path(tmp.name) / ONNX_INT8))
    out = prepare_run_dir(output, force=force)
    if tmp is not None:
        shutil.move(str(Path(tmp.name) / ONNX_INT8), out / ONNX_INT8)
        tmp.cleanup()
    save_model(
        out, qmodel, classes=info.classes, task=info.task, data=info.data, extra={"quantized_from": str(src)}
    )
    write_text(out / CONFIG, (src / CONFIG).read_text())
    write_metrics(out, {**metrics, **summary})
    write_json(
        out / QUANT_JSON,
        {
            **summary,
            "config": final_cfg.model_dump(),
            "layers": get_manifest(qmodel).transforms[-1].config["resolved_bits"],
            "reparameterized": report.reparameterized,
            "smoothed": report.smoothed,
            "gelu_shift_folded": report.folded,
            "reconstruction_mse": report.reconstruction_mse,
        },
    )
    if final_cfg.mixed_precision is not None:
        from vitkit.compress.quant.mixed import plot_bits

        plot_bits(final_cfg.layer_bits, out / "bits.png")
    return summary, out

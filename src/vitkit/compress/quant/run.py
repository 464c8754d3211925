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
from pathlib import Path
from typing import Any

from vitkit.compress.quant.config import QuantConfig, make_config
from vitkit.compress.quant.transform import REPORT_ATTR, quantize
from vitkit.errors import VitkitError
from vitkit.io import write_json, write_text
from vitkit.models import get_manifest, model_input_size
from vitkit.runs import CONFIG, prepare_run_dir, read_run, save_model, write_metrics

QUANT_JSON = "quant.json"


def quantize_run(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    config: QuantConfig | dict[str, Any] | None = None,
    *,
    force: bool = False,
    device: str = "cpu",
    **overrides: Any,
) -> tuple[dict[str, Any], Path]:
    """Quantize ``run_dir``'s model into the new run ``output``; returns (summary, output path)."""
    from vitkit.api import data_splits_for
    from vitkit.runs import load
    from vitkit.train import build_config, evaluate

    cfg = make_config(config, **overrides)
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
        "simulated": True,  # fake quantization in float32: no INT8 kernel ran, no speedup claimed
    }
    final_cfg = QuantConfig(
        **{k: v for k, v in get_manifest(qmodel).transforms[-1].config.items() if k != "resolved_bits"}
    )
    if final_cfg.layer_bits:
        from vitkit.compress.quant.mixed import average_bits

        summary["avg_weight_bits"] = average_bits(final_cfg.layer_bits, model)
    out = prepare_run_dir(output, force=force)
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

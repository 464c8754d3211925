"""Deployment benchmark: timm fp32 eager vs bf16 eager vs onnxruntime fp32 vs onnxruntime dynamic INT8,
same process, interleaved; plus ONNX export parity for each model kind.

    python bench/deploy.py [--run runs/demo/vit] [--batch 8] [--threads 2] [--repeats 5] [-o out.json]

Models: the demo model (vitkit_micro_p4_16 at 16 px; the trained run's weights with --run, which also
gives accuracies on its held-out split) and deit_small_patch16_224 at 224 px with random weights
(timing does not depend on the weights). Parity: max |logit diff| PyTorch vs onnxruntime on 16
inputs for plain, distilled, register-token and DeiT-III (LayerScale) ViTs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from vitkit.deploy import BenchConfig, compare, export_onnx
from vitkit.deploy.benchmark import _Autocast, _Runtime
from vitkit.deploy.onnx import OnnxModel
from vitkit.models import create_model, model_input_size


def quantize(src: Path, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def runtimes(model: torch.nn.Module, tmp: Path, name: str, threads: int) -> dict[str, torch.nn.Module]:
    shape = model_input_size(model)
    fp32 = tmp / f"{name}.onnx"
    export_onnx(model, fp32, shape)
    int8 = tmp / f"{name}.int8.onnx"
    quantize(fp32, int8)
    return {
        "timm fp32 eager": model,
        "timm bf16 eager (autocast)": _Autocast(model),
        "onnxruntime fp32": _Runtime(OnnxModel(fp32, threads=threads)),
        "onnxruntime int8 (dynamic)": _Runtime(OnnxModel(int8, threads=threads)),
    }


def bench_model(model, tmp, name, cfg) -> dict:
    variants = runtimes(model.eval(), tmp, name, cfg.threads)
    res = compare(variants, model_input_size(model), cfg, measure_flops=False)
    base = res["timm fp32 eager"]
    out = {}
    for k, r in res.items():
        d = r.to_dict()
        d["throughput_vs_fp32"] = r.throughput / base.throughput
        # spread of the ratio: per-round ratios (rounds are interleaved, so round i is comparable)
        ratios = [a / b for a, b in zip(r.throughput_rounds, base.throughput_rounds, strict=True)]
        d["ratio_rounds_min_max"] = (min(ratios), max(ratios))
        out[k] = d
    return out


def parity_kinds(tmp: Path) -> dict[str, float]:
    kinds = {
        "plain (vitkit_micro_p4_16)": ("vitkit_micro_p4_16", {}),
        "distilled (vitkit_micro_distilled_p4_16)": ("vitkit_micro_distilled_p4_16", {}),
        "register tokens (vit_small_patch16_224, reg_tokens=4, 64 px)": (
            "vit_small_patch16_224", dict(img_size=64, reg_tokens=4)),
        "deit3 (deit3_small_patch16_224, LayerScale, 64 px)": ("deit3_small_patch16_224", dict(img_size=64)),
        "deit_small_patch16_224 (224 px)": ("deit_small_patch16_224", {}),
    }  # fmt: skip
    out = {}
    g = torch.Generator().manual_seed(0)
    for label, (name, kw) in kinds.items():
        m = create_model(name, num_classes=10, **kw).eval()
        x = torch.randn(16, *model_input_size(m), generator=g)
        r = export_onnx(m, tmp / "parity.onnx", model_input_size(m), check_images=x)
        out[label] = r.max_abs_diff
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="trained demo run (else random weights)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-calls", type=int, default=3)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    cfg = BenchConfig(threads=a.threads, repeats=a.repeats, warmup=1, latency_calls=a.latency_calls,
                      throughput_batch=a.batch)  # fmt: skip
    doc: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": os.getloadavg(),
        "config": cfg.__dict__,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if a.run:
            from vitkit.deploy.export import export_run
            from vitkit.runs import load

            demo = load(a.run)
            doc["demo_export"] = export_run(a.run, int8="dynamic", images=1000).doc
        else:
            demo = create_model("vitkit_micro_p4_16", num_classes=10)
        doc["demo"] = bench_model(demo, tmp, "demo", cfg)
        doc["deit_small"] = bench_model(create_model("deit_small_patch16_224"), tmp, "deit", cfg)
        doc["parity"] = parity_kinds(tmp)
    doc["load_after"] = os.getloadavg()
    for key in ("demo", "deit_small"):
        print(f"\n{key} (batch {a.batch}, {a.threads} threads, median of {a.repeats})")
        print("| runtime | img/s | spread | vs fp32 | ratio range | lat b=1 p50 ms |")
        print("|---|---|---|---|---|---|")
        for k, r in doc[key].items():
            s, (lo, hi) = r["throughput_spread"], r["ratio_rounds_min_max"]
            print(f"| {k} | {r['throughput']:.1f} | {s[0]:.1f}–{s[1]:.1f} | {r['throughput_vs_fp32']:.2f}x "
                  f"| {lo:.2f}–{hi:.2f} | {r['latency_ms_p50']:.2f} |")  # fmt: skip
    print("\n| model kind | max abs logit diff |\n|---|---|")
    for k, v in doc["parity"].items():
        print(f"| {k} | {v:.1e} |")
    if "demo_export" in doc:
        e = doc["demo_export"]
        print(f"\ndemo accuracy: torch {e['top1_pytorch']:.4f}, onnx {e['top1_onnx']:.4f}, "
              f"int8 {e['int8']['top1']:.4f} on {e['parity_images']} held-out images")  # fmt: skip
    print(f"load average before/after: {doc['load_before']} / {doc['load_after']}")
    if a.output:
        Path(a.output).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()

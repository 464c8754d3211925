"""Deployment benchmark: timm fp32 eager vs bf16 eager vs onnxruntime fp32 vs onnxruntime dynamic INT8,
same process, interleaved; plus ONNX export parity for each model kind.

    python -m bench deploy [--run runs/demo/vit] [--batch 8] [--threads 2] [--repeats 5]

Models: the demo model (vitkit_micro_p4_16 at 16 px; the trained run's weights with --run, which also
gives accuracies on its held-out split) and deit_small_patch16_224 at 224 px with random weights
(timing does not depend on the weights). Parity: max |logit diff| PyTorch vs onnxruntime on 16
inputs for plain, distilled, register-token and DeiT-III (LayerScale) ViTs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.harness import Output, Table, ratio_spread

QUICK = {"batch": 2, "repeats": 1, "latency_calls": 1, "deit": False}


def add_arguments(p) -> None:
    p.add_argument("--run", default=None, help="trained demo run (else random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency-calls", type=int, default=3)
    p.add_argument("--no-deit", dest="deit", action="store_false", help="skip deit_small (224 px)")


def quantize(src: Path, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def runtimes(model, tmp: Path, name: str, threads: int) -> dict:
    from vitkit.deploy import export_onnx
    from vitkit.deploy.onnx import OnnxModel
    from vitkit.deploy.runtimes import Autocast, Runtime
    from vitkit.models import model_input_size

    shape = model_input_size(model)
    fp32 = tmp / f"{name}.onnx"
    export_onnx(model, fp32, shape)
    int8 = tmp / f"{name}.int8.onnx"
    quantize(fp32, int8)
    return {
        "timm fp32 eager": model,
        "timm bf16 eager (autocast)": Autocast(model),
        "onnxruntime fp32": Runtime(OnnxModel(fp32, threads=threads)),
        "onnxruntime int8 (dynamic)": Runtime(OnnxModel(int8, threads=threads)),
    }


def bench_model(model, tmp, name, cfg) -> dict:
    from vitkit.deploy import compare
    from vitkit.models import model_input_size

    variants = runtimes(model.eval(), tmp, name, cfg.threads)
    res = compare(variants, model_input_size(model), cfg, measure_flops=False)
    base = res["timm fp32 eager"]
    out = {}
    for k, r in res.items():
        d = r.to_dict()
        d["throughput_vs_fp32"] = r.throughput / base.throughput
        d["ratio_rounds_min_max"] = ratio_spread(r.throughput_rounds, base.throughput_rounds)
        out[k] = d
    return out


def parity_kinds(tmp: Path, quick: bool = False) -> dict[str, float]:
    import torch

    from vitkit.deploy import export_onnx
    from vitkit.models import create_model, model_input_size

    kinds = {
        "plain (vitkit_micro_p4_16)": ("vitkit_micro_p4_16", {}),
        "distilled (vitkit_micro_distilled_p4_16)": ("vitkit_micro_distilled_p4_16", {}),
        "register tokens (vit_small_patch16_224, reg_tokens=4, 64 px)": (
            "vit_small_patch16_224", dict(img_size=64, reg_tokens=4)),
        "deit3 (deit3_small_patch16_224, LayerScale, 64 px)": ("deit3_small_patch16_224", dict(img_size=64)),
        "deit_small_patch16_224 (224 px)": ("deit_small_patch16_224", {}),
    }  # fmt: skip
    if quick:
        kinds = dict(list(kinds.items())[:1])
    out = {}
    g = torch.Generator().manual_seed(0)
    for label, (name, kw) in kinds.items():
        m = create_model(name, num_classes=10, **kw).eval()
        x = torch.randn(16, *model_input_size(m), generator=g)
        r = export_onnx(m, tmp / "parity.onnx", model_input_size(m), check_images=x)
        out[label] = r.max_abs_diff
    return out


def run(args) -> Output:
    from vitkit.deploy import BenchConfig
    from vitkit.models import create_model

    cfg = BenchConfig(threads=args.threads, repeats=args.repeats, warmup=1, latency_calls=args.latency_calls,
                      throughput_batch=args.batch)  # fmt: skip
    extra: dict = {"config": cfg.__dict__}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.run:
            from vitkit.runs import load
            from vitkit.stages.export import export_run

            demo = load(args.run)
            extra["demo_export"] = export_run(args.run, int8="dynamic", images=1000).doc
        else:
            demo = create_model("vitkit_micro_p4_16", num_classes=10)
        models = {"demo": bench_model(demo, tmp, "demo", cfg)}
        if args.deit:
            models["deit_small"] = bench_model(create_model("deit_small_patch16_224"), tmp, "deit", cfg)
        parity = parity_kinds(tmp, quick=args.quick)
    records = []
    for model, rows in models.items():
        for runtime, r in rows.items():
            lo, hi = r["ratio_rounds_min_max"]
            s_lo, s_hi = r["throughput_spread"]
            records.append({"table": "speed", "model": model, "runtime": runtime, "throughput": r["throughput"],
                            "throughput_min": s_lo, "throughput_max": s_hi, "ratio": r["throughput_vs_fp32"],
                            "ratio_min": lo, "ratio_max": hi, "latency_ms_p50": r["latency_ms_p50"]})  # fmt: skip
    records += [{"table": "parity", "kind": k, "max_abs_diff": v} for k, v in parity.items()]
    notes = [
        f"Throughput at batch {args.batch}, {args.threads} threads, median of {args.repeats} interleaved rounds; "
        "ratio vs timm fp32 eager of the same model (min-max of the per-round ratios)."
    ]
    if "demo_export" in extra:
        e = extra["demo_export"]
        notes.append(f"Demo accuracy ({args.run}): torch {e['top1_pytorch']:.4f}, onnx {e['top1_onnx']:.4f}, "
                     f"int8 {e['int8']['top1']:.4f} on {e['parity_images']} held-out images.")  # fmt: skip
    extra["models"] = models
    tables = [
        Table(
            name="speed",
            columns=[
                ("model", "{model}"),
                ("runtime", "{runtime}"),
                ("img/s", "{throughput:.1f}"),
                ("spread", "{throughput_min:.1f}-{throughput_max:.1f}"),
                ("vs fp32", "{ratio:.2f}x"),
                ("ratio range", "{ratio_min:.2f}-{ratio_max:.2f}"),
                ("lat b=1 p50 ms", "{latency_ms_p50:.2f}"),
            ],
        ),
        Table(
            name="parity", columns=[("model kind", "{kind}"), ("max abs logit diff", "{max_abs_diff:.1e}")]
        ),
    ]
    return Output(records=records, tables=tables, notes=notes, extra=extra)

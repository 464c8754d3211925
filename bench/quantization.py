"""Post-training quantization benchmark: top-1 of every method at W8A8 / W4A4 / W3A3 against FP32
measured in the same process, over calibration seeds; calibration wall time; post-softmax and
post-GELU quantization MSE per quantizer on tensors captured from the model.

    python bench/quantization.py --run RUN_DIR [--bits 8 4 3] [--seeds 0 1 2] [--methods ...] [--out f.json]

RUN_DIR is a vitkit run (trained with `vitkit train`); calibration images come from its training
split, accuracy from its validation split. All numbers are simulated (fake) quantization.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time

import torch

METHODS = ["minmax", "percentile", "omse", "ptq4vit", "repq", "ias", "dopq", "adalog"]


def captured_tensors(model, images):
    """Post-softmax probabilities and post-GELU activations of the first and last block."""
    from vitkit.models.attention import Softmax, VitkitAttention

    got = {"softmax": [], "gelu": []}
    hooks = []
    for m in model.modules():
        if isinstance(m, VitkitAttention):
            m.force_unfused = True  # run the explicit softmax module (the fused kernel skips it)
        if type(m) is Softmax:
            hooks.append(m.register_forward_hook(lambda mod, a, o: got["softmax"].append(o.detach())))
        if isinstance(m, torch.nn.GELU):
            hooks.append(m.register_forward_hook(lambda mod, a, o: got["gelu"].append(o.detach())))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    for m in model.modules():
        if isinstance(m, VitkitAttention):
            m.force_unfused = False
    return {k: torch.cat([t.reshape(-1) for t in v]) for k, v in got.items()}


def quantizer_mse(tensors, bits_list):
    import importlib

    Q = importlib.import_module("vitkit.compress.quant.quantizers")  # the package's quantizers() shadows it

    rows = []
    eta = Q.GELU_MIN
    for bits in bits_list:
        sm, gl = tensors["softmax"], tensors["gelu"]
        for name, q in [
            ("uniform", Q.UniformQuantizer(bits)),
            ("log2", Q.Log2Quantizer(bits)),
            ("log√2 (RepQ)", Q.LogSqrt2Quantizer(bits)),
            ("twin (PTQ4ViT)", Q.TwinUniformQuantizer(bits, "softmax")),
            ("AdaLog", Q.AdaLogQuantizer(bits)),
            ("SULQ (I&S)", Q.ShiftLog2Quantizer(bits)),
            ("TanQ (DopQ)", Q.TanQuantizer(bits)),
        ]:
            q.calibrate(sm)
            rows.append({"tensor": "post-softmax", "bits": bits, "quantizer": name, "mse": q.mse(sm)})
        for name, q in [
            ("uniform", Q.UniformQuantizer(bits)),
            ("twin (PTQ4ViT)", Q.TwinUniformQuantizer(bits, "gelu")),
            ("AdaLog", Q.AdaLogQuantizer(bits, shift=eta)),
        ]:
            q.calibrate(gl)
            rows.append({"tensor": "post-GELU", "bits": bits, "quantizer": name, "mse": q.mse(gl)})
    return rows


def mixed_precision(model, splits, args) -> None:
    """Greedy vs LRP (relevance) vs reverse (most sensitive first) vs uniform allocation at the same
    average bits."""
    from vitkit.compress.quant import quantize
    from vitkit.compress.quant.mixed import average_bits
    from vitkit.train import evaluate

    rows = []
    for seed in args.seeds:
        fp = evaluate(model, splits.val)["top1"]
        for strategy in args.strategies:
            q = quantize(copy.deepcopy(model), splits.train, method=args.methods[0], calib_size=args.calib,
                         seed=seed, mixed_precision=strategy, avg_bits=args.mixed, bit_choices=args.choices)  # fmt: skip
            bits = q.vitkit_manifest.transforms[-1].config["layer_bits"]
            row = {"strategy": strategy, "seed": seed, "fp32": fp, "top1": evaluate(q, splits.val)["top1"],
                   "avg_bits": average_bits(bits, q)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\n| allocation ({args.methods[0]}, choices {args.choices}, budget {args.mixed}) | avg bits | top-1 mean ± sd (n) |"
    )
    print("|---|---|---|")
    for strategy in args.strategies:
        rs = [r for r in rows if r["strategy"] == strategy]
        t = [r["top1"] for r in rs]
        sd = statistics.stdev(t) if len(t) > 1 else 0.0
        print(f"| {strategy} | {statistics.mean(r['avg_bits'] for r in rs):.2f} | "
              f"{100 * statistics.mean(t):.2f} ± {100 * sd:.2f} ({len(t)}) |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--mixed", type=float, default=None, help="only the mixed-precision comparison at this avg bits"
    )
    ap.add_argument("--choices", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--strategies", nargs="+", default=["greedy", "lrp", "reverse", "uniform"])
    ap.add_argument("--reconstruct", type=int, default=0, help="block-reconstruction iterations (0: off)")
    ap.add_argument("--skip-mse", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "uptime before:",
        subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        flush=True,
    )

    import vitkit
    from vitkit.api import data_splits_for
    from vitkit.compress.quant import quantize
    from vitkit.models import model_input_size
    from vitkit.train import build_config, evaluate
    from vitkit.train.evaluate import eval_transform

    model = vitkit.load(args.run)
    splits = data_splits_for(build_config(f"{args.run}/config.yaml"), model_input_size(model)[1])
    if args.mixed is not None:
        mixed_precision(model, splits, args)
        return
    results = {"fp32_top1": [], "rows": [], "mse": []}
    imgs = eval_transform(model).images(splits.train.images[:64])
    if not args.skip_mse:
        results["mse"] = quantizer_mse(captured_tensors(model, imgs), [4, 3])
    for r in results["mse"]:
        print(f"MSE {r['tensor']:13s} {r['bits']}b {r['quantizer']:15s} {r['mse']:.3e}", flush=True)
    for bits in args.bits:
        for method in args.methods:
            for seed in args.seeds:
                fp = evaluate(model, splits.val)["top1"]  # FP32 in the same process, interleaved
                t0 = time.perf_counter()
                q = quantize(copy.deepcopy(model), splits.train, method=method, w_bits=bits, a_bits=bits,
                             calib_size=args.calib, seed=seed,
                             reconstruct=args.reconstruct > 0, recon_iters=max(args.reconstruct, 1))  # fmt: skip
                wall = time.perf_counter() - t0
                top1 = evaluate(q, splits.val)["top1"]
                row = {"method": method + ("+recon" if args.reconstruct else ""), "bits": bits, "seed": seed, "fp32": fp, "top1": top1,
                       "calib_s": q.vitkit_quant_report.seconds, "wall_s": wall}  # fmt: skip
                results["rows"].append(row)
                results["fp32_top1"].append(fp)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(results, f, indent=1)
    print("\n| bits | method | top-1 mean ± sd (n) | drop vs FP32 (pt) | calib s (median) |")
    print("|---|---|---|---|---|")
    fp = statistics.mean(results["fp32_top1"])
    for bits in args.bits:
        for method in args.methods:
            rs = [r for r in results["rows"] if r["bits"] == bits and r["method"].split("+")[0] == method]
            t = [r["top1"] for r in rs]
            sd = statistics.stdev(t) if len(t) > 1 else 0.0
            calib = statistics.median(r["calib_s"] for r in rs)
            print(f"| W{bits}A{bits} | {rs[0]['method']} | {100 * statistics.mean(t):.2f} ± {100 * sd:.2f} ({len(t)}) "
                  f"| {100 * (fp - statistics.mean(t)):+.2f} | {calib:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
    print("uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

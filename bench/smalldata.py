"""Small-data ViTs (issue 9): GMM attention, DHVT, EWA and the compressed stem against a plain ViT of
matched size trained the same way in the same script, plus As-ViT's Kendall-τ on a configuration grid.

    python -m bench smalldata-accuracy --datasets digits,digits-lt10 --seeds 0,1,2 --epochs 30
    python -m bench smalldata-throughput
    python -m bench smalldata-rank --epochs 5 --train-seeds 1 --patches 4   # 12 configurations

Every variant trains through ``vitkit.api.train_model`` with ``TrainConfig.transforms`` (exactly what
``vitkit train --transform ...`` does), from scratch, same recipe and epochs, seeds interleaved so
machine drift hits all variants alike. Accuracy rows are saved one by one to
bench/out/partial/smalldata-accuracy_DATASET[TAG].json (a re-run skips them unless --fresh; processes
with different --tag run seeds in parallel, and each one's tables merge every tag's rows); the rank plot
goes to bench/out/smalldata-rank.png.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import OUT_DIR, Output, Table, log, ratio_spread

PARTIAL = OUT_DIR / "partial"
QUICK = {"datasets": "digits", "variants": "vit,gmm", "seeds": "0", "epochs": 1, "repeats": 1, "fresh": True,
         "patches": "4", "train_seeds": 1}  # fmt: skip

# name -> (model, transforms); vit is the baseline; dhvt is the DHVT preset matched to its parameters
VARIANTS = {
    "vit": ("vitkit_micro_p4_16", []),
    "gmm": ("vitkit_micro_p4_16", ["gmm:k=5"]),
    "gmm-additive": ("vitkit_micro_p4_16", ["gmm:k=5,form=additive"]),
    "dhvt": ("vitkit_dhvt_micro_p4_16", []),
    "ewa": ("vitkit_micro_p4_16", ["ewa:experts=4,share=0.3"]),
    "stem": ("vitkit_micro_p4_16", ["stem:compression=2"]),
}
DATASETS = {"digits": dict(data="digits"), "digits-lt10": dict(data="digits", longtail=10.0)}


def recipe(epochs: int, seed: int, threads: int) -> dict:
    """One recipe for every variant (the vitkit demo's, scaled): AdamW, cosine, light augmentation."""
    return dict(
        epochs=epochs,
        lr=2e-3,
        warmup_epochs=3 if epochs > 5 else 0,
        batch_size=64,
        scale_min=0.8,
        translate=0.1,
        label_smoothing=0.1,
        seed=seed,
        threads=threads,
        tensorboard=False,
    )


def add_arguments(p) -> None:
    p.add_argument("--datasets", default="digits,digits-lt10")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--patches",
        default="2,4",
        help="rank: patch sizes of the grid (depth 1,2,4 x width 32,64 x heads 2,4)",
    )
    p.add_argument("--train-seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="[default: 1 to train, 2 to time throughput]")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tag", default="", help="suffix of the partial-results file, to run seeds in parallel")
    p.add_argument("--fresh", action="store_true", help="ignore results already in the partial-results file")


def run_accuracy(args) -> None:
    from vitkit.api import train_model
    from vitkit.train import TrainConfig

    variants = args.variants.split(",")
    for ds in args.datasets.split(","):
        path = _partial(args, ds)
        results = json.loads(path.read_text()) if path.is_file() and not args.fresh else []
        done = {(r["variant"], r["seed"]) for r in results}
        for seed in (int(s) for s in args.seeds.split(",")):
            for v in variants:
                if (v, seed) in done:
                    continue
                model, transforms = VARIANTS[v]
                cfg = TrainConfig(
                    model=model,
                    transforms=transforms,
                    **DATASETS[ds],
                    **recipe(args.epochs, seed, args.threads),
                )
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    run = train_model(cfg, Path(tmp) / "run", quiet=True)
                m = run.metrics
                row = {
                    "variant": v,
                    "dataset": ds,
                    "seed": seed,
                    "epochs": args.epochs,
                    "top1": m["top1"],
                    "balanced_accuracy": m["balanced_accuracy"],
                    "few_shot_accuracy": m.get("few_shot_accuracy"),
                    "parameters": m["parameters"],
                    "train_seconds": m["train_seconds"],
                    "wall_seconds": time.perf_counter() - t0,
                }
                results.append(row)
                log(json.dumps(row))
                _write(path, results)


def run_throughput(args) -> dict:
    from vitkit.architecture.ewa import merge_ewa
    from vitkit.deploy.timing import BenchConfig, compare
    from vitkit.models import create_model
    from vitkit.registry import get_train_transform

    def build(model: str, transforms: list[str], img: int):
        torch.manual_seed(0)
        m = create_model(model, num_classes=10, img_size=img)
        for spec in transforms:
            m = get_train_transform(spec).apply(m)
        if any(s.startswith("ewa") for s in transforms):
            m = merge_ewa(m)  # what is deployed
        return m.eval()

    cfg = BenchConfig(threads=args.threads, repeats=args.repeats)
    out = {}
    small = {v: build(*VARIANTS[v], 16) for v in VARIANTS}
    out["16px"] = {k: r.to_dict() for k, r in compare(small, (3, 16, 16), cfg).items()}
    big = {
        "vit": build("vitkit_tiny_p4_32", [], 32),
        "gmm": build("vitkit_tiny_p4_32", ["gmm:k=5"], 32),
        "stem": build("vitkit_tiny_p4_32", ["stem:compression=2"], 32),
    }
    out["32px"] = {k: r.to_dict() for k, r in compare(big, (3, 32, 32), cfg).items()}
    return out


def run_rank(args):
    from vitkit.analyze.rank import config_grid, plot_ranking, rank_configs

    specs = config_grid([1, 2, 4], [32, 64], [2, 4], [int(v) for v in args.patches.split(",")], 16)
    res = rank_configs(
        specs,
        {
            "repeats": 3,
            "complexity": {"points": 128},
            "train_epochs": args.epochs,
            "train_seeds": args.train_seeds,
            "threads": args.threads,
        },
        # an hour or more on 2 shared cores: every ranked candidate is kept, a cut-short run resumes
        cache=None if args.quick else PARTIAL / "smalldata-rank.json",
    )
    if not args.quick:
        plot_ranking(res, OUT_DIR / "smalldata-rank.png")
    return res


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _partial(args, ds: str) -> Path:
    return PARTIAL / f"smalldata-accuracy{'-quick' if args.quick else ''}_{ds}{args.tag}.json"


def _write(path: Path, obj) -> None:
    from vitkit.io import write_json

    write_json(path, obj)


def accuracy(args) -> Output:
    args.threads = args.threads or 1  # 1 trains best on a shared 2-core machine
    run_accuracy(args)
    records, tables, files = [], [], []
    for ds in args.datasets.split(","):
        rows = []
        for path in sorted(
            PARTIAL.glob(_partial(args, ds).name.replace(f"_{ds}{args.tag}.json", f"_{ds}*.json"))
        ):
            # the glob for "digits" also finds digits-lt10's file: keep this dataset's rows only
            mine = [
                r for r in json.loads(path.read_text()) if r["epochs"] == args.epochs and r["dataset"] == ds
            ]
            if mine:
                files.append(path.name)
                rows += mine
        base = {r["seed"]: r for r in rows if r["variant"] == "vit"}
        for v in VARIANTS:
            rs = [r for r in rows if r["variant"] == v]
            if not rs:
                continue
            deltas = [100 * (r["top1"] - base[r["seed"]]["top1"]) for r in rs if r["seed"] in base]
            few = [100 * r["few_shot_accuracy"] for r in rs if r.get("few_shot_accuracy") is not None]
            rec = {"table": ds, "variant": v, "parameters": rs[0]["parameters"], "n": len(rs)}
            rec["top1"], rec["top1_sd"] = _mean_sd([100 * r["top1"] for r in rs])
            rec["bal"], rec["bal_sd"] = _mean_sd([100 * r["balanced_accuracy"] for r in rs])
            if v != "vit" and deltas:
                rec["delta"], rec["delta_sd"] = _mean_sd(deltas)
            if few:
                rec["few"], rec["few_sd"] = _mean_sd(few)
            records.append(rec)
        tables.append(Table(name=ds, title=f"{ds} ({args.epochs} epochs, seeds {sorted(base)})", columns=[
            ("variant", "{variant}"), ("parameters (inference)", "{parameters:,}"),
            ("val top-1 % (n)", "{top1:.1f} ± {top1_sd:.1f} ({n})"), ("Δ vs ViT, paired (pt)", "{delta:+.1f} ± {delta_sd:.1f}"),
            ("balanced acc %", "{bal:.1f} ± {bal_sd:.1f}"), ("few-shot acc %", "{few:.1f} ± {few_sd:.1f}")]))  # fmt: skip
    notes = [f"Mean ± sd over seeds; every variant trained from scratch with the same recipe, {args.threads} "
             f"thread(s). Rows from {', '.join(files)} (bench/out/partial)."]  # fmt: skip
    return Output(records=records, tables=tables, notes=notes)


def throughput(args) -> Output:
    args.threads = args.threads or 2
    out = run_throughput(args)
    records = []
    for size, res in out.items():
        base = res["vit"]
        for k, r in res.items():
            lo, hi = ratio_spread(r["throughput_rounds"], base["throughput_rounds"])
            records.append({"table": "throughput", "size": size, "variant": k, "parameters": r["parameters"],
                            "gflops": r["flops"] / 1e9, "throughput": r["throughput"],
                            "throughput_min": r["throughput_spread"][0], "throughput_max": r["throughput_spread"][1],
                            "ratio": r["throughput"] / base["throughput"], "ratio_min": lo, "ratio_max": hi,
                            "latency_ms_p50": r["latency_ms_p50"]})  # fmt: skip
    notes = [f"Throughput at batch 64, img/s, median of {args.repeats} interleaved rounds [min-max]; ratio vs the "
             f"plain ViT of the same size, per-round min-max; {args.threads} threads."]  # fmt: skip
    table = Table(name="throughput", columns=[
        ("input", "{size}"), ("variant", "{variant}"), ("parameters", "{parameters:,}"), ("GFLOPs/img", "{gflops:.4f}"),
        ("img/s", "{throughput:.0f} [{throughput_min:.0f}-{throughput_max:.0f}]"),
        ("ratio vs ViT", "{ratio:.2f} [{ratio_min:.2f}-{ratio_max:.2f}]"),
        ("latency p50 ms (batch 1)", "{latency_ms_p50:.2f}")])  # fmt: skip
    return Output(records=records, tables=[table], notes=notes, extra=out)


def rank(args) -> Output:
    args.threads = args.threads or 1
    res = run_rank(args)
    notes = [f"As-ViT proxy: {len(res.rows)} configs, Kendall-τ {res.kendall_tau:.3f} (p {res.p_value:.3g}); "
             f"parameter count τ {res.params_kendall_tau:.3f}; {args.epochs} training epochs x {args.train_seeds} "
             "seed(s) per config."]  # fmt: skip
    table = Table(name="rank", columns=[("config", "{name}"), ("parameters", "{parameters:,}"),
                                        ("complexity", "{complexity:.4g}"), ("val top-1", "{val_top1:.3f}")])  # fmt: skip
    return Output(
        records=[{"table": "rank", **r} for r in res.rows], tables=[table], notes=notes, extra=res.to_dict()
    )

"""Small-data ViTs (issue 9): GMM attention, DHVT, EWA and the compressed stem against a plain ViT of
matched size trained the same way in the same script, plus As-ViT's Kendall-τ on a configuration grid.

    python bench/smalldata.py accuracy --datasets digits,digits-lt10 --seeds 0,1,2 --epochs 30
    python bench/smalldata.py throughput
    python bench/smalldata.py rank --epochs 5 --train-seeds 1 --patches 4   # 12 configurations
    python bench/smalldata.py report          # markdown tables from the JSON files

Every variant trains through ``vitkit.api.train_model`` with ``TrainConfig.transforms`` (exactly what
``vitkit train --transform ...`` does), from scratch, same recipe and epochs, seeds interleaved so
machine drift hits all variants alike. Results go to bench/out/smalldata/*.json (+ PNG plots).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out" / "smalldata"

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


def run_accuracy(args) -> None:
    from vitkit.api import train_model
    from vitkit.train import TrainConfig

    variants = args.variants.split(",")
    for ds in args.datasets.split(","):
        path = OUT / f"accuracy_{ds}{args.tag}.json"
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
                print(json.dumps(row), flush=True)
                _write(path, results)


def run_throughput(args) -> None:
    from vitkit.deploy.bench import BenchConfig, compare
    from vitkit.models import create_model
    from vitkit.registry import get_train_transform
    from vitkit.smalldata.ewa import merge_ewa

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
    _write(OUT / "throughput.json", out)
    for size, res in out.items():
        base = res["vit"]["throughput"]
        for k, r in res.items():
            print(
                f"{size} {k:13s} {r['parameters']:>9,} params  {r['throughput']:8.0f} img/s  x{r['throughput'] / base:.2f}"
            )


def run_rank(args) -> None:
    from vitkit.smalldata.rank import config_grid, plot_ranking, rank_configs

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
    )
    _write(OUT / "rank.json", res.to_dict())
    plot_ranking(res, OUT / "rank.png")
    for r in res.rows:
        print(f"{r['name']:14s} {r['parameters']:>8,}  {r['complexity']:.4g}  {r['val_top1']:.3f}")
    print(f"kendall tau {res.kendall_tau:.3f} (p {res.p_value:.3g}); parameters {res.params_kendall_tau:.3f}")


def _mean_std(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.1f} ± {sd:.1f}"


def report(args) -> None:
    by_dataset: dict[str, list] = {}
    for path in sorted(OUT.glob("accuracy_*.json")):  # one file per dataset and --tag
        for r in json.loads(path.read_text()):
            by_dataset.setdefault(r["dataset"], []).append(r)
    for ds, rows in by_dataset.items():
        base = {r["seed"]: r for r in rows if r["variant"] == "vit"}
        print(f"\n{ds} ({rows[0]['epochs']} epochs, seeds {sorted(base)})\n")
        print(
            "| variant | parameters (inference) | val top-1 % | Δ vs ViT, paired (pt) | balanced acc % | few-shot acc % |"
        )
        print("|---|---|---|---|---|---|")
        for v in VARIANTS:
            rs = [r for r in rows if r["variant"] == v]
            if not rs:
                continue
            deltas = [r["top1"] - base[r["seed"]]["top1"] for r in rs if r["seed"] in base]
            few = [r["few_shot_accuracy"] for r in rs if r.get("few_shot_accuracy") is not None]
            print(
                f"| {v} | {rs[0]['parameters']:,} | {_mean_std([r['top1'] for r in rs])} | "
                f"{'—' if v == 'vit' else _mean_std(deltas)} | {_mean_std([r['balanced_accuracy'] for r in rs])} | "
                f"{_mean_std(few) if few else '—'} |"
            )
    tp = OUT / "throughput.json"
    if tp.is_file():
        for size, res in json.loads(tp.read_text()).items():
            base = res["vit"]
            print(f"\nthroughput {size} (batch 64, img/s, median of rounds [min–max])\n")
            print("| variant | parameters | GFLOPs/img | img/s | ratio vs ViT | latency p50 ms (batch 1) |")
            print("|---|---|---|---|---|---|")
            for k, r in res.items():
                lo, hi = r["throughput_spread"]
                ratio_lo, ratio_hi = lo / base["throughput"], hi / base["throughput"]
                print(
                    f"| {k} | {r['parameters']:,} | {r['flops'] / 1e9:.4f} | {r['throughput']:.0f} [{lo:.0f}–{hi:.0f}] | "
                    f"{r['throughput'] / base['throughput']:.2f} [{ratio_lo:.2f}–{ratio_hi:.2f}] | {r['latency_ms_p50']:.2f} |"
                )
    rk = OUT / "rank.json"
    if rk.is_file():
        res = json.loads(rk.read_text())
        print(
            f"\nAs-ViT proxy: {len(res['rows'])} configs, Kendall-τ {res['kendall_tau']:.3f} "
            f"(p {res['p_value']:.3g}); parameter count τ {res['params_kendall_tau']:.3f}"
        )


def _write(path: Path, obj) -> None:
    from vitkit.io import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["accuracy", "throughput", "rank", "report"])
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
    p.add_argument("--threads", type=int, default=1, help="1 trains best on a shared 2-core machine")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tag", default="", help="suffix of the result file, to run seeds in parallel processes")
    p.add_argument("--fresh", action="store_true", help="ignore results already in the JSON file")
    args = p.parse_args(argv)
    if args.part == "throughput" and args.threads == 1:
        args.threads = 2
    {"accuracy": run_accuracy, "throughput": run_throughput, "rank": run_rank, "report": report}[args.part](
        args
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

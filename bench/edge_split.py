"""ED-ViT split inference (issue 24 evidence), several seeds, every run in this process (the served
measurement in torchrun processes it starts):

  edge-split: a ``vitkit_micro_p4_16`` trained on a Fashion-MNIST subset, split by ``vitkit split`` into
              2 and 5 class-wise sub-models (half the heads and MLP channels pruned, 2 fine-tuning epochs
              each, fusion MLP); fused top-1 vs the source and vs argmax over the sub-models' logits,
              weights per sub-model; the 2-way split served by ``vitkit serve-split`` (2 processes, one
              per core): batch-1 latency, throughput and peak memory per process vs the unsplit model.

    python -m bench edge-split            # the recorded run
    python -m bench edge-split --quick    # smoke
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

from pathlib import Path

from bench.dense import MEAN_SD, _ms, run_seeds
from bench.harness import Output, Table

QUICK = {"seeds": [0], "epochs": 1, "train": 512, "val": 256, "devices": [2]}
NAME = "edge-split"


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8, help="training epochs of the source model")
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--val", type=int, default=2000)
    p.add_argument("--devices", type=int, nargs="+", default=[2, 5])
    p.add_argument("--prune", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)


def _seed(args, seed: int, tmp: Path) -> dict:
    from vitkit.stages.serve_split import serve_split
    from vitkit.stages.split import split_run
    from vitkit.stages.train import train_model

    src = tmp / f"src-{seed}"
    cfg = dict(model="vitkit_micro_p4_16", data="fashion-mnist", train_size=args.train, val_size=args.val,
               epochs=args.epochs, lr=2e-3, warmup_epochs=min(1, args.epochs - 1), seed=seed, threads=args.threads, tensorboard=False)  # fmt: skip
    train_model(cfg, src, quiet=True)
    row: dict = {}
    for n in args.devices:
        r = split_run(src, tmp / f"split{n}-{seed}", devices=n, prune=args.prune, epochs=2, seed=seed)
        row[str(n)] = {
            k: r[k]
            for k in (
                "fused_top1",
                "concat_argmax_top1",
                "source_top1",
                "source_weight_mb",
                "max_sub_weight_mb",
            )
        }
        if n == 2:
            row[str(n)]["serve"] = serve_split(tmp / f"split{n}-{seed}", requests=100, batch=64, threads=1)
    return row


def run(args) -> Output:
    opts = {k: getattr(args, k) for k in ("epochs", "train", "val", "devices", "prune", "threads")}
    res = run_seeds(NAME, opts, args.seeds, lambda seed, tmp: _seed(args, seed, tmp))
    seeds = list(res["seeds"].values())
    rec: list[dict] = [{"table": "acc", "arm": "source (unsplit)", **_ms([s[str(args.devices[0])]["source_top1"] for s in seeds]),
                        "mb": seeds[0][str(args.devices[0])]["source_weight_mb"]}]  # fmt: skip
    for n in args.devices:
        k = str(n)
        rec.append({"table": "acc", "arm": f"{n} sub-models, fused", "mb": seeds[0][k]["max_sub_weight_mb"],
                    **_ms([s[k]["fused_top1"] for s in seeds])})  # fmt: skip
        rec.append({"table": "acc", "arm": f"{n} sub-models, argmax over their logits", "mb": seeds[0][k]["max_sub_weight_mb"],
                    **_ms([s[k]["concat_argmax_top1"] for s in seeds])})  # fmt: skip
        rec.append({"table": "acc", "arm": f"{n} sub-models fused - source (per seed)", "mb": 0.0,
                    **_ms([s[k]["fused_top1"] - s[k]["source_top1"] for s in seeds])})  # fmt: skip
    if "2" in seeds[0] and "serve" in seeds[0]["2"]:
        sv = [s["2"]["serve"] for s in seeds]
        for what, key, unit in (("batch-1 latency p50, split (2 processes)", ("latency_ms", "split_p50"), "ms"),
                                ("batch-1 latency p50, unsplit (1 process)", ("latency_ms", "unsplit_p50"), "ms"),
                                ("throughput at batch 64, split", ("throughput", "split"), "img/s"),
                                ("throughput at batch 64, unsplit", ("throughput", "unsplit"), "img/s")):  # fmt: skip
            rec.append({"table": "serve", "what": what, "unit": unit, **_ms([v[key[0]][key[1]] for v in sv])})
        rec.append({"table": "serve", "what": "peak RSS per process (max)", "unit": "MB",
                    **_ms([max(v["peak_rss_mb"]) for v in sv])})  # fmt: skip
        rec.append({"table": "serve", "what": "served top-1 - split top-1", "unit": "",
                    **_ms([v["served_top1"] - v["split_top1"] for v in sv])})  # fmt: skip
    o = res["options"]
    notes = [
        f"Source: vitkit_micro_p4_16 on {o['train']} Fashion-MNIST training images, {o['epochs']} epochs; validation "
        f"{o['val']} images. Split: vitkit split --devices N --prune {o['prune']} --epochs 2 (classes by similarity, "
        "an 'other' class per sub-model, Taylor pruning of heads and MLP channels, fusion MLP 20 epochs). MB = fp32 "
        "weights of the largest sub-model. Serving: vitkit serve-split on the 2-way split, 2 processes (one per "
        "core), 1 thread each, gloo; the unsplit model timed on process 0 in the same run. The sub-models train 2 "
        "epochs more than the source (fine-tuning after pruning), so 'fused - source' includes that extra training. "
        "ED-ViT has no public "
        f"code (our reading). Seeds {list(res['seeds'])} (mean ± sd); wall {res.get('wall_seconds', '?')} s.",
    ]
    tables = [
        Table(name="acc", columns=[("model", "{arm}"), ("weights MB", "{mb:.2f}"), ("val top-1", MEAN_SD)]),
        Table(
            name="serve", columns=[("measure", "{what}"), ("value", "{mean:.3g} ± {sd:.2g} {unit} (n={n})")]
        ),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

"""Deep Model Assembling vs end-to-end training at the same budget (issue 23 evidence), several seeds:

arch-assemble: the target is ``vitkit_micro_p4_16`` at depth 8 (width 64, 0.4M parameters); end to
               end it trains E epochs; assembled, the notes' split of the same budget: the meta model
               (depth 4) E/4 epochs, each of the 4 modules (2 blocks) E/4 epochs in its place, the
               assembled model E/4 epochs of fine-tuning. Fashion-MNIST subset at 16 px; validation
               top-1 and training seconds (modules summed, and as if run in parallel: their max).

  python -m bench arch-assemble            # the recorded run
  python -m bench arch-assemble --quick    # smoke
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

import time
from pathlib import Path

from bench.dense import MEAN_SD, _ms, run_seeds
from bench.harness import Output, Table

QUICK = {"seeds": [0], "epochs": 4, "train": 512, "val": 256}
NAME = "arch-assemble"


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=16, help="the end-to-end budget E (each phase: E/4)")
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--val", type=int, default=2000)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--modules", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)


def _train(args, seed: int) -> dict:
    return dict(
        model="vitkit_micro_p4_16", model_kwargs={"depth": args.depth}, data="fashion-mnist",
        train_size=args.train, val_size=args.val, lr=args.lr, warmup_epochs=1, scale_min=0.8, translate=0.1,
        seed=seed, threads=args.threads, tensorboard=False, epochs=args.epochs,
    )  # fmt: skip


def _seed(args, seed: int, tmp: Path) -> dict:
    from vitkit.stages.assemble import assemble
    from vitkit.stages.train import train_model

    t0 = time.perf_counter()
    e2e = train_model(_train(args, seed), tmp / f"e2e-{seed}", quiet=True)
    e2e_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = assemble(_train(args, seed), tmp / f"asm-{seed}", modules=args.modules, quiet=True)
    asm_s = time.perf_counter() - t0
    mods = [m["seconds"] for m in r["modules"]]
    return {
        "e2e": {"top1": e2e.metrics["top1"], "seconds": round(e2e_s, 1)},
        "assembled": {
            "top1": r["top1"],
            "seconds": round(asm_s, 1),
            "parallel_seconds": round(r["meta"]["seconds"] + max(mods) + r["finetune"]["seconds"], 1),
            "meta_top1": r["meta"]["top1"],
            "module_top1": [m["top1"] for m in r["modules"]],
        },
    }


def run(args) -> Output:
    opts = {k: getattr(args, k) for k in ("epochs", "train", "val", "depth", "modules", "lr", "threads")}
    res = run_seeds(NAME, opts, args.seeds, lambda seed, tmp: _seed(args, seed, tmp))
    seeds = list(res["seeds"].values())
    rec = [
        {"table": "acc", "arm": "end to end (E epochs)", **_ms([s["e2e"]["top1"] for s in seeds])},
        {"table": "acc", "arm": "assembled + fine-tuned (E/4 per phase)", **_ms([s["assembled"]["top1"] for s in seeds])},
        {"table": "acc", "arm": "meta model alone (depth = modules)", **_ms([s["assembled"]["meta_top1"] for s in seeds])},
        {"table": "acc", "arm": "assembled - end to end (per seed)",
         **_ms([s["assembled"]["top1"] - s["e2e"]["top1"] for s in seeds])},
        {"table": "cost", "arm": "end to end", **_ms([s["e2e"]["seconds"] for s in seeds])},
        {"table": "cost", "arm": "assembled, modules one after another", **_ms([s["assembled"]["seconds"] for s in seeds])},
        {"table": "cost", "arm": "assembled, modules in parallel (meta + slowest module + fine-tune)",
         **_ms([s["assembled"]["parallel_seconds"] for s in seeds])},
    ]  # fmt: skip
    o = res["options"]
    notes = [
        f"Target: vitkit_micro_p4_16 at depth {o['depth']} (width 64), {o['modules']} modules of "
        f"{o['depth'] // o['modules']} blocks; Fashion-MNIST {o['train']} training / {o['val']} validation images at "
        f"16 px; AdamW lr {o['lr']}, batch 64, scale-crop 0.8, shift 0.1, {o['threads']} thread(s). End to end: "
        f"{o['epochs']} epochs (1 warm-up). Assembled: meta (depth {o['modules']}), each module and the fine-tuning "
        f"{max(1, o['epochs'] // 4)} epochs each (fine-tuning without warm-up, gradient clip 1). Seeds "
        f"{list(res['seeds'])} (mean ± sd); wall {res.get('wall_seconds', '?')} s; seconds are as noisy as the load.",
    ]
    tables = [
        Table(name="acc", columns=[("arm", "{arm}"), ("val top-1", MEAN_SD)]),
        Table(name="cost", columns=[("arm", "{arm}"), ("training seconds", "{mean:.0f} ± {sd:.0f} (n={n})")]),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

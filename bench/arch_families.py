"""The new architecture families vs a plain ViT (issue 23 evidence), several seeds, every run in this
process:

  arch-families: ``vitkit_micro_p4_16`` (plain ViT), ``vitkit_tic_micro_p4_16`` (TiC, MSA-Conv),
                 ``vitkit_dualtoken_micro_16`` (DualToken-ViT), ``vitkit_hyena_micro_p4_16`` (Hyena N-D)
                 and ``vitkit_vitamin_micro_16`` (ViTamin), all about 0.2M parameters, trained from
                 scratch with one recipe on a Fashion-MNIST subset at 16 px; validation top-1 at the
                 training resolution and at 2x (32 px) for the families that take another resolution;
                 training throughput.

    python -m bench arch-families            # the recorded run
    python -m bench arch-families --quick    # smoke: one seed, 1 epoch, small sets

The result so far is saved after every seed to bench/out/partial/arch-families.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

import time
from pathlib import Path

from bench.arch_hyena import _top1_at
from bench.dense import MEAN_SD, _ms, run_seeds
from bench.harness import Output, Table

QUICK = {"seeds": [0], "epochs": 1, "train": 256, "val": 128}
NAME = "arch-families"
#: the families that take another input size at run time (DualToken-ViT is built for one size)
DYNAMIC = {"vit", "tic", "hyena", "vitamin"}
ARMS = {
    "vit": "vitkit_micro_p4_16",
    "tic": "vitkit_tic_micro_p4_16",
    "dualtoken": "vitkit_dualtoken_micro_16",
    "hyena": "vitkit_hyena_micro_p4_16",
    "vitamin": "vitkit_vitamin_micro_16",
}


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train", type=int, default=5000, help="Fashion-MNIST training images (stratified)")
    p.add_argument("--val", type=int, default=2000, help="Fashion-MNIST validation images")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)


def _seed(args, seed: int, tmp: Path) -> dict:
    from vitkit.api import train_model
    from vitkit.runs import Run
    from vitkit.train import TrainConfig

    row = {}
    for arm, model in ARMS.items():
        cfg = TrainConfig(
            model=model, data="fashion-mnist", train_size=args.train, val_size=args.val, epochs=args.epochs,
            lr=args.lr, warmup_epochs=min(1, args.epochs - 1), scale_min=0.8, translate=0.1, seed=seed,
            threads=args.threads, model_kwargs={"dynamic_img_size": True} if arm in DYNAMIC else {},
            tensorboard=False,
        )  # fmt: skip
        t0 = time.perf_counter()
        run = train_model(cfg, tmp / f"{arm}-{seed}", quiet=True)
        seconds = time.perf_counter() - t0
        r = Run.open(tmp / f"{arm}-{seed}")
        model_, val = r.model(), r.eval_data()
        try:
            top1_32 = _top1_at(model_, val, 32)
        except Exception as e:  # a family that runs at its training size only says so in the table
            top1_32 = None
            row.setdefault("no_32", {})[arm] = f"{type(e).__name__}: {e}"[:200]
        if arm == "tic":  # TiC's window keeps its size in tokens; vitkit's grid dilation (not the paper's)
            from vitkit.models.tic import set_grid_dilation

            row["tic_grid_dilation_32"] = _top1_at(set_grid_dilation(model_), val, 32)
        row[arm] = {
            "top1": run.metrics["top1"],
            "top1_16": _top1_at(model_, val, 16),
            "top1_32": top1_32,
            "parameters": sum(p.numel() for p in model_.parameters()),
            "train_seconds": round(seconds, 1),
            "img_per_s": sum(h["img_per_s"] for h in run.history) / len(run.history),
        }
    return row


def run(args) -> Output:
    opts = {k: getattr(args, k) for k in ("epochs", "train", "val", "lr", "threads")}
    res = run_seeds(NAME, opts, args.seeds, lambda seed, tmp: _seed(args, seed, tmp))
    seeds = list(res["seeds"].values())
    rec: list[dict] = []
    for arm, model in ARMS.items():
        rec.append({"table": "acc", "arm": f"{arm} ({model})", "metric": "top-1 at 16 px (training size)",
                    **_ms([s[arm]["top1_16"] for s in seeds])})  # fmt: skip
        if all(s[arm]["top1_32"] is not None for s in seeds):
            rec.append({"table": "acc", "arm": f"{arm} ({model})", "metric": "top-1 at 32 px (2x)",
                        **_ms([s[arm]["top1_32"] for s in seeds])})  # fmt: skip
    if all("tic_grid_dilation_32" in s for s in seeds):
        rec.append({"table": "acc", "arm": "tic + set_grid_dilation (vitkit's, not the paper's)",
                    "metric": "top-1 at 32 px (2x)", **_ms([s["tic_grid_dilation_32"] for s in seeds])})  # fmt: skip
    for arm in list(ARMS)[1:]:
        diff = [s[arm]["top1_16"] - s["vit"]["top1_16"] for s in seeds]
        rec.append(
            {"table": "acc", "arm": f"{arm} - vit (per seed)", "metric": "top-1 at 16 px", **_ms(diff)}
        )
    for arm, model in ARMS.items():
        rec.append({"table": "cost", "arm": f"{arm} ({model})", "parameters": seeds[0][arm]["parameters"],
                    "seconds": _ms([s[arm]["train_seconds"] for s in seeds])["mean"],
                    **_ms([s[arm]["img_per_s"] for s in seeds])})  # fmt: skip
    o = res["options"]
    no32 = {a: m for s in seeds for a, m in s.get("no_32", {}).items()}
    notes = [
        f"Fashion-MNIST, {o['train']} training / {o['val']} validation images at 16 px, {o['epochs']} epochs, AdamW lr "
        f"{o['lr']} (cosine, 1 warm-up epoch), scale-crop 0.8, shift 0.1, batch 64, {o['threads']} thread(s); seeds "
        f"{list(res['seeds'])} (mean ± sd); wall {res.get('wall_seconds', '?')} s. Every model is built with "
        "dynamic_img_size=True except DualToken-ViT (built for one input size); 16 and 32 px columns resize the "
        "validation images the same way.",
        "Training img/s is the loop's per-epoch figure, as noisy as the machine's load (recorded above).",
        *(f"No 32 px row for {a}: {m}" for a, m in no32.items()),
    ]
    tables = [
        Table(name="acc", columns=[("model", "{arm}"), ("metric", "{metric}"), ("value", MEAN_SD)]),
        Table(
            name="cost",
            columns=[
                ("model", "{arm}"),
                ("parameters", "{parameters:,}"),
                ("train s", "{seconds:.0f}"),
                ("train img/s", "{mean:.0f} ± {sd:.0f}"),
            ],
        ),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

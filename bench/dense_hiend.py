"""Hi-End-MAE vs MAE vs no pretraining, for segmentation with few labels (issue 19, part 7), several seeds.

Per seed, in this process, on the same generated canvases and the same ViT:
  1. self-supervised pretraining on the training canvases (labels unused): MAE with its 2-block decoder,
     MAE with a 4-block decoder (as deep as Hi-End-MAE's 2 self-attention + 2 cross-attention blocks,
     so that a deeper decoder alone is not mistaken for the hierarchy), and Hi-End-MAE (default taps);
  2. segmentation fine-tuning (UperNet head) on a class-stratified tenth of the labelled canvases, from
     each pretrained encoder and from scratch, with the same loop settings.
Recorded: the pretraining loss against its mean-patch baselines, and the fine-tuned mIoU.

    python -m bench dense-hiend            # the recorded run
    python -m bench dense-hiend --quick    # smoke: one seed, 1 epoch, small sets

The result so far is saved after every arm to bench/out/partial/dense-hiend.json (a cut-short run keeps it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

import tempfile
import time
from pathlib import Path

from bench.dense import MEAN_SD, MODEL, _load_partial, _ms, _save_partial, complete_seeds
from bench.harness import Output, Table, log

QUICK = {"seeds": [0], "pretrain_epochs": 1, "epochs": 1, "train": 64, "val": 32}
# pretraining arms: (method, MAE settings); the loop settings are each method's recipe
PRETRAIN_ARMS = {
    "mae": ("mae", {"decoder_depth": 2}),
    "mae-deep-decoder": ("mae", {"decoder_depth": 4}),
    "hi-end-mae": ("hi-end-mae", {"decoder_depth": 2}),
}
FINETUNE_ARMS = ["scratch", *PRETRAIN_ARMS]
NAME = "dense-hiend"
TARGETS = {
    "raw": "raw pixels (the papers normalise each patch; on canvases, items over uniform noise, that target "
    "is mostly noise)",
    "norm": "each patch normalised (the papers')",
}


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch (~100 labelled canvases)")
    p.add_argument("--train", type=int, default=1000, help="training canvases (all for pretraining)")
    p.add_argument("--val", type=int, default=200, help="validation canvases")
    p.add_argument("--labels-fraction", type=float, default=0.1)
    # 32 px (64 tokens of 4 px): MAE pretraining at 64 px costs ~16x more per epoch on this CPU
    p.add_argument("--size", type=int, default=32, help="canvas side (px)")
    p.add_argument("--classes", type=int, default=3, help="item classes (digits 0..N-1)")
    # raw pixels by default: on canvases (items over uniform noise) the papers' per-patch normalised
    # target is mostly noise; in a one-seed pilot neither MAE nor Hi-End-MAE beat the mean patch with it
    p.add_argument(
        "--target",
        choices=["norm", "raw"],
        default="raw",
        help="patch target: raw pixels or normalised (papers)",
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=MODEL)


def _options(args) -> dict:
    keys = ("pretrain_epochs", "epochs", "train", "val", "labels_fraction", "size", "classes", "target", "lr",
            "batch_size", "threads", "model")  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def _loop(args, seed: int, data: str, epochs: int) -> dict:
    return {
        "model": args.model,
        "img_size": args.size,
        "data": data,
        "epochs": epochs,
        "lr": args.lr,
        "warmup_epochs": min(1, epochs - 1),
        "seed": seed,
        "threads": args.threads,
        "tensorboard": False,
    }


def _pretrain(args, seed: int, data: str, arm: str, out: Path) -> dict:
    from vitkit.pretrain.presets import get_recipe, with_recipe
    from vitkit.stages.pretrain import pretrain_mae
    from vitkit.train import build_config

    method, mae = PRETRAIN_ARMS[arm]
    rec = get_recipe(method)
    cfg = build_config(**with_recipe(rec.pretrain, _loop(args, seed, data, args.pretrain_epochs)))
    mae = {**mae, "norm_pix_loss": args.target == "norm"}
    run = pretrain_mae(cfg, out, mae=with_recipe(rec.mae, mae), method=method, quiet=True)
    m = run.metrics
    keep = ("val_loss", "val_mean_baseline", "val_position_mean_baseline", "train_seconds", "parameters")
    return {k: m[k] for k in keep}


def _finetune(args, seed: int, data: str, arm: str, source: Path | None, out: Path) -> dict:
    from vitkit.adapt.peft import subsample_labels
    from vitkit.api import data_splits_for, train_model
    from vitkit.stages.finetune import finetune
    from vitkit.train import build_config

    loop = {**_loop(args, seed, data, args.epochs), "task": "segmentation", "batch_size": args.batch_size}
    t0 = time.perf_counter()
    if source is None:  # the fine-tuning recipe's regularisation, without layer decay (no pretrained layers)
        cfg = build_config(**loop, drop_path=0.1, weight_decay=0.05)
        splits = subsample_labels(data_splits_for(cfg, args.size), args.labels_fraction, seed)
        m = train_model(cfg, out, data=splits, quiet=True).metrics
    else:
        m = finetune(source, out, loop, labels_fraction=args.labels_fraction, quiet=True).metrics
    keep = ("miou", "pixel_accuracy", "mean_accuracy", "train_seconds")
    return {**{k: m[k] for k in keep}, "train_size": m["data_description"]["train_size"],
            "wall_seconds": time.perf_counter() - t0}  # fmt: skip


def run(args) -> Output:
    data = f"canvas:size={args.size},classes={args.classes},train={args.train},val={args.val}"
    res = _load_partial(NAME, _options(args))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            got = res["seeds"].setdefault(str(seed), {})
            for arm in FINETUNE_ARMS:
                if arm in got:
                    continue
                source = None
                pre: dict = {}
                if arm in PRETRAIN_ARMS:
                    log(f"{NAME} seed {seed}: pretrain {arm}")
                    source = Path(tmp) / f"pre-{arm}-{seed}"
                    pre = _pretrain(args, seed, data, arm, source)
                log(f"{NAME} seed {seed}: fine-tune {arm}")
                row = _finetune(args, seed, data, arm, source, Path(tmp) / f"ft-{arm}-{seed}")
                got[arm] = {**row, **{f"pretrain_{k}": v for k, v in pre.items()}}
                _save_partial(NAME, res)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return _report(res, data)


def _report(res: dict, data: str) -> Output:
    keys = complete_seeds(res, FINETUNE_ARMS)
    seeds = [res["seeds"][k] for k in keys]
    rec: list[dict] = []
    for arm in FINETUNE_ARMS:
        for metric in ("miou", "pixel_accuracy", "mean_accuracy"):
            rec.append({"table": "seg", "arm": arm, "metric": metric, **_ms([s[arm][metric] for s in seeds])})
    for arm in FINETUNE_ARMS[1:]:
        diff = [s[arm]["miou"] - s["scratch"]["miou"] for s in seeds]
        rec.append({"table": "seg", "arm": f"{arm} - scratch (per seed)", "metric": "miou", **_ms(diff)})
    for arm in ("mae", "mae-deep-decoder"):
        diff = [s["hi-end-mae"]["miou"] - s[arm]["miou"] for s in seeds]
        rec.append({"table": "seg", "arm": f"hi-end-mae - {arm} (per seed)", "metric": "miou", **_ms(diff)})
    for arm in PRETRAIN_ARMS:
        row = {"table": "pretrain", "arm": arm}
        for k in ("val_loss", "val_mean_baseline", "val_position_mean_baseline", "train_seconds"):
            row[k] = _ms([s[arm][f"pretrain_{k}"] for s in seeds])["mean"]
        row["parameters"] = seeds[0][arm]["pretrain_parameters"]
        rec.append(row)
    o = res["options"]
    n_lab = seeds[0]["scratch"]["train_size"] if seeds else "?"
    notes = [
        f"{data}, {o['model']} at {o['size']} px; pretraining {o['pretrain_epochs']} epochs on all "
        f"{o['train']} training canvases (labels unused; each method's recipe: mask 0.75, crop scale 0.2-1, "
        f"wd 0.05; patch target: {TARGETS[o['target']]}); fine-tuning {o['epochs']} epochs, UperNet head, "
        f"batch {o['batch_size']}, on {n_lab} labelled canvases (labels fraction {o['labels_fraction']}, "
        f"class-stratified), lr {o['lr']}, {o['threads']} threads; seeds {keys} (mean ± sd); wall "
        f"{res.get('wall_seconds', '?')} s. Scratch: the same loop with drop-path 0.1 and wd 0.05 (the "
        "fine-tuning recipe without layer decay).",
        "Pretraining loss: masked-patch MSE against the target; 'mean patch' and 'position mean' are the "
        "losses of predicting the average target patch (overall / per position).",
    ]
    tables = [
        Table(name="seg", columns=[("arm", "{arm}"), ("val metric", "{metric}"), ("value", MEAN_SD)]),
        Table(
            name="pretrain",
            columns=[
                ("pretraining arm", "{arm}"),
                ("parameters (enc + dec)", "{parameters:,}"),
                ("val loss", "{val_loss:.4f}"),
                ("mean patch", "{val_mean_baseline:.4f}"),
                ("position mean", "{val_position_mean_baseline:.4f}"),
                ("train seconds", "{train_seconds:.0f}"),
            ],
        ),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

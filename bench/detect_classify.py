"""Detect -> crop -> classify on canvases whose items share one class per canvas (issue 20 part 4,
the "YOLOv8 + DeiT" brain-tumour pipeline's shape with vitkit's own detector), several seeds:

  per seed: FCOS over a micro ViT trained on ``canvas-boxes:same_class=true``; the true boxes of the
  training canvases and the detections on the validation canvases cut into crops (``vitkit crop``);
  a CNN teacher (resnet10t) trained on the training crops and a DeiT (micro, DIST token) distilled
  from it; both evaluated on the detected validation crops, per crop (image-level) and per canvas
  (group-level: the crops' mean probabilities), with the low-confidence (anomaly) share.

    python -m bench detect-classify            # the recorded run
    python -m bench detect-classify --quick    # smoke: one seed, 1 epoch, small sets

The result so far is saved after every seed to bench/out/partial/detect-classify.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

from pathlib import Path

from bench.dense import MEAN_SD, _ms, run_seeds
from bench.harness import Output, Table

QUICK = {"seeds": [0], "epochs": 2, "cls_epochs": 1, "train": 64, "val": 24, "min_score": 0.05}
NAME = "detect-classify"
KEYS = ("top1", "group_top1", "anomaly_fraction", "top1_confident")


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10, help="detector epochs")
    p.add_argument("--cls-epochs", type=int, default=20, help="DeiT epochs (the CNN teacher: 8)")
    p.add_argument("--train", type=int, default=600, help="training canvases")
    p.add_argument("--val", type=int, default=150, help="validation canvases")
    p.add_argument("--size", type=int, default=32, help="canvas side (px)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--crop", type=int, default=16, help="crop side (px)")
    p.add_argument("--min-score", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=2)


def _options(args) -> dict:
    keys = ("epochs", "cls_epochs", "train", "val", "size", "classes", "crop", "min_score", "threads")
    return {k: getattr(args, k) for k in keys}


def _seed(args, seed: int, data: str, tmp: Path) -> dict:
    from vitkit.api import evaluate_run, train_model
    from vitkit.stages.crop import crop_boxes
    from vitkit.stages.distill import distill
    from vitkit.train import TrainConfig

    common = dict(seed=seed, threads=args.threads, tensorboard=False)
    warm = lambda epochs: {"warmup_epochs": min(1, epochs - 1)}  # noqa: E731
    det = tmp / f"det-{seed}"
    run = train_model(
        TrainConfig(
            model="vitkit_micro_p4_16", task="detection", data=data, epochs=args.epochs, lr=3e-3, **common
        ),
        det,
        quiet=True,
    )
    row: dict = {"detector": {k: run.metrics[k] for k in ("map", "map_50")}}
    train_npz, val_npz = tmp / f"train-{seed}.npz", tmp / f"val-{seed}.npz"
    crop_boxes(det, train_npz, split="train", boxes="truth", size=args.crop)
    row["crops"] = crop_boxes(
        det, val_npz, split="val", boxes="detected", min_score=args.min_score, size=args.crop
    )
    crops = f"npz:{train_npz}"
    cnn_cfg = dict(
        model="resnet10t", data=crops, img_size=args.crop, epochs=max(1, args.cls_epochs * 2 // 5), lr=3e-3
    )
    train_model(TrainConfig(**cnn_cfg, **common, **warm(cnn_cfg["epochs"])), tmp / f"cnn-{seed}", quiet=True)
    deit_cfg = dict(model="vitkit_micro_distilled_p4_16", data=crops, epochs=args.cls_epochs, lr=2e-3)
    distill(
        TrainConfig(**deit_cfg, **common),
        tmp / f"deit-{seed}",
        teacher=tmp / f"cnn-{seed}",
        method="deit",
        quiet=True,
    )
    for arm in ("cnn", "deit"):
        m, _ = evaluate_run(tmp / f"{arm}-{seed}", data=f"npz:{val_npz}")
        row[arm] = {k: m[k] for k in (*KEYS, "groups")}
    return row


def run(args) -> Output:
    data = f"canvas-boxes:size={args.size},classes={args.classes},same_class=true,train={args.train},val={args.val}"
    res = run_seeds(NAME, _options(args), args.seeds, lambda seed, tmp: _seed(args, seed, data, tmp))
    seeds = list(res["seeds"].values())
    rec: list[dict] = []
    for arm, name in (("deit", "DeiT (distilled from the CNN)"), ("cnn", "CNN teacher (resnet10t)")):
        for key, what in (("top1", "per crop (image level)"), ("group_top1", "per canvas (group level)"),
                          ("top1_confident", "per crop, anomalies left out"),
                          ("anomaly_fraction", "anomaly share (top probability < 0.5)")):  # fmt: skip
            values = [s[arm][key] for s in seeds if s[arm][key] is not None]  # None: every crop an anomaly
            if values:
                rec.append({"table": "cls", "arm": name, "metric": what, **_ms(values)})
        diff = [s[arm]["group_top1"] - s[arm]["top1"] for s in seeds]
        rec.append({"table": "cls", "arm": name, "metric": "group - crop level (per seed)", **_ms(diff)})
    for key in ("map", "map_50"):
        rec.append({"table": "det", "what": f"detector {key}", **_ms([s["detector"][key] for s in seeds])})
    for key in ("crops", "matched", "unmatched", "missed", "groups"):
        rec.append(
            {"table": "det", "what": f"validation {key}", **_ms([float(s["crops"][key]) for s in seeds])}
        )
    notes = [
        f"{data}; FCOS over vitkit_micro_p4_16 ({args.epochs} epochs); crops {args.crop} px (true boxes for training, "
        f"detections >= {args.min_score} after class-agnostic NMS for validation, labelled by the true box they "
        f"overlap at IoU >= 0.5); resnet10t teacher, vitkit_micro_distilled_p4_16 DeiT; {args.threads} threads; "
        f"seeds {list(res['seeds'])} (mean ± sd); wall {res.get('wall_seconds', '?')} s.",
        "Group level: each canvas's crops vote with their mean class probabilities against the canvas's class "
        "(every item of a canvas shares it); canvases without a matched detection are not scored.",
    ]
    tables = [
        Table(
            name="cls",
            columns=[
                ("classifier", "{arm}"),
                ("on detected validation crops", "{metric}"),
                ("value", MEAN_SD),
            ],
        ),
        Table(name="det", columns=[("stage", "{what}"), ("value", "{mean:.4g} ± {sd:.2g} (n={n})")]),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

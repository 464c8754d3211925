"""Object detection on generated canvases (issue 20), several seeds, every run in this process:

  detect-canvas: two detectors over ViTDet's simple feature pyramid of the same plain ViT, trained on
                 ``canvas-boxes`` with the same recipe and epochs: torchvision's FCOS and transformers'
                 Deformable DETR; COCO mAP / mAP50 / mAP75 on the validation canvases, against FCOS
                 untrained (the floor a broken training would score); then W8A8 of the FCOS run (mAP50
                 before and after).

    python -m bench detect-canvas            # the recorded run
    python -m bench detect-canvas --quick    # smoke: one seed, 1 epoch, small sets

The result so far is saved after every seed to bench/out/partial/detect-canvas.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

from pathlib import Path

from bench.dense import COST_TABLE, MEAN_SD, MODEL, _ms, _train, run_seeds
from bench.harness import Output, Table

QUICK = {"seeds": [0], "epochs": 1, "train": 64, "val": 32}
NAME = "detect-canvas"
KEYS = ("map", "map_50", "map_75", "mar_100")


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train", type=int, default=1000, help="training canvases")
    p.add_argument("--val", type=int, default=200, help="validation canvases")
    p.add_argument("--size", type=int, default=64, help="canvas side (px)")
    p.add_argument("--classes", type=int, default=10, help="item classes (digits 0..N-1)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=MODEL)


def _options(args) -> dict:
    keys = ("epochs", "train", "val", "size", "classes", "lr", "threads", "model")
    return {k: getattr(args, k) for k in keys}


def _seed(args, seed: int, data: str, tmp: Path) -> dict:
    import torch

    from vitkit.api import data_splits_for
    from vitkit.data import seed_everything
    from vitkit.models import create_model
    from vitkit.stages.quantize import quantize_run
    from vitkit.tasks import get_task
    from vitkit.train import build_config

    out = tmp / f"fcos-{seed}"
    m = _train(args, seed, "detection", data, out)
    row = {"fcos": {k: m[k] for k in (*KEYS, "train_seconds", "parameters")}}
    d = _train(args, seed, "detection:detector=deformable-detr", data, tmp / f"detr-{seed}")
    row["deformable-detr"] = {k: d[k] for k in (*KEYS, "train_seconds", "parameters")}
    # the floor: the same detector, untrained (what a training that learns nothing would score)
    task = get_task("detection")
    cfg = build_config(model=args.model, img_size=args.size, task="detection", data=data, seed=seed)
    splits = data_splits_for(cfg, args.size)
    seed_everything(seed)
    untrained = task.build_head(
        create_model(args.model, num_classes=args.classes, img_size=args.size), args.classes
    )
    with torch.no_grad():
        floor = task.evaluate(untrained.eval(), splits.val)
    row["untrained"] = {k: floor[k] for k in KEYS}
    summary, _ = quantize_run(out, tmp / f"q-{seed}", w_bits=8, a_bits=8)
    row["fcos"]["w8a8_map_50"] = summary["quant_map_50"]
    return row


def detect(args) -> Output:
    data = f"canvas-boxes:size={args.size},classes={args.classes},train={args.train},val={args.val}"
    res = run_seeds(NAME, _options(args), args.seeds, lambda seed, tmp: _seed(args, seed, data, tmp))
    seeds = list(res["seeds"].values())
    rec: list[dict] = []
    arms = (("fcos", "FCOS over the ViT"), ("deformable-detr", "Deformable DETR over the ViT"),
            ("untrained", "FCOS untrained (floor)"))  # fmt: skip
    for arm, name in arms:
        for key in KEYS:
            rec.append({"table": "det", "arm": name, "metric": key, **_ms([s[arm][key] for s in seeds])})
    diff = [s["deformable-detr"]["map_50"] - s["fcos"]["map_50"] for s in seeds]
    rec.append({"table": "det", "arm": "Deformable DETR - FCOS (per seed)", "metric": "map_50", **_ms(diff)})
    drop = [100 * (s["fcos"]["map_50"] - s["fcos"]["w8a8_map_50"]) for s in seeds]
    rec.append(
        {
            "table": "quant",
            "what": "W8A8 (minmax, ViT + pyramid + FCOS convs) mAP50 drop, points",
            **_ms(drop),
        }
    )
    for arm in ("fcos", "deformable-detr"):
        rec.append({"table": "cost", "arm": arm, "parameters": seeds[0][arm]["parameters"] if seeds else 0,
                    **_ms([s[arm]["train_seconds"] for s in seeds])})  # fmt: skip
    o = res["options"]
    notes = [
        f"{data}, {o['model']} at {o['size']} px, {o['epochs']} epochs, lr {o['lr']}, batch 64, {o['threads']} threads; "
        f"seeds {list(res['seeds'])} (mean ± sd); wall {res.get('wall_seconds', '?')} s.",
        "COCO metrics by torchmetrics' MeanAveragePrecision (pycocotools backend) on the validation canvases, "
        "whose items come from the other half of the digit images. FCOS: score >= 0.05, NMS 0.6; Deformable "
        "DETR (2 + 2 layers, d_model = the pyramid width, 50 queries): the 100 best (query, class) pairs, "
        "score >= 0.05. One learning rate for both (the ViT recipe's), no DETR-specific backbone lr or "
        "schedule: DETRs are known to need far longer schedules than dense detectors.",
    ]
    tables = [
        Table(name="det", columns=[("detector", "{arm}"), ("val metric", "{metric}"), ("value", MEAN_SD)]),
        Table(name="quant", columns=[("trained run", "{what}"), ("value", "{mean:.3g} ± {sd:.2g} (n={n})")]),
        COST_TABLE,
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

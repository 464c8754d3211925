"""Co-DETR vs the Deformable DETR it trains (issue 20), several seeds, every run in this process:

  detect-codetr: transformers' Deformable DETR over ViTDet's simple feature pyramid of the same plain
                 ViT, trained on ``canvas-boxes`` with one DETR recipe (AdamW, gradient clipping at
                 0.1) for the same epochs and steps, alone (``--detector detr``) and with Co-DETR's
                 collaborative hybrid assignments (``--detector co-detr``: ATSS + Faster R-CNN
                 auxiliary heads and their positive query groups). COCO mAP / mAP50 / mAP75 on the
                 validation canvases, per epoch (convergence) and at the end; training seconds.

    python -m bench detect-codetr            # the recorded run
    python -m bench detect-codetr --quick    # smoke: one seed, 1 epoch, small sets

The result so far is saved after every seed to bench/out/partial/detect-codetr.json; the
convergence plot goes to bench/out/detect-codetr.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

import csv
from pathlib import Path

from bench.dense import COST_TABLE, MEAN_SD, MODEL, _ms, _train, run_seeds
from bench.harness import OUT_DIR, Output, Table

QUICK = {"seeds": [0], "epochs": 1, "train": 64, "val": 32}
NAME = "detect-codetr"
KEYS = ("map", "map_50", "map_75", "mar_100")
ARMS = {"detr": "Deformable DETR", "co-detr": "Co-DETR (ATSS + Faster R-CNN aux.)"}


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train", type=int, default=1000, help="training canvases")
    p.add_argument("--val", type=int, default=200, help="validation canvases")
    p.add_argument("--size", type=int, default=64, help="canvas side (px)")
    p.add_argument("--classes", type=int, default=10, help="item classes (digits 0..N-1)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip-grad", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=MODEL)


def _options(args) -> dict:
    keys = ("epochs", "train", "val", "size", "classes", "lr", "clip_grad", "threads", "model")
    return {k: getattr(args, k) for k in keys}


def _curve(run: Path) -> list[float]:
    with open(run / "history.csv") as f:
        return [float(r["val_map_50"]) for r in csv.DictReader(f)]


def _seed(args, seed: int, data: str, tmp: Path) -> dict:
    row = {}
    for arm in ARMS:
        out = tmp / f"{arm}-{seed}"
        m = _train(args, seed, "detection", data, out, detector=arm, clip_grad=args.clip_grad)
        row[arm] = {k: m[k] for k in (*KEYS, "train_seconds", "parameters")}
        row[arm]["curve"] = _curve(out)
    return row


def _plot(seeds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for arm, label in ARMS.items():
        curves = [s[arm]["curve"] for s in seeds]
        n = min(len(c) for c in curves)
        for i, c in enumerate(curves):
            ax.plot(range(1, n + 1), c[:n], color="C1" if arm == "co-detr" else "C0", alpha=0.8,
                    label=label if i == 0 else None)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mAP50")
    ax.set_title("Deformable DETR over a ViT, with and without Co-DETR (one line per seed)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> Output:
    data = f"canvas-boxes:size={args.size},classes={args.classes},train={args.train},val={args.val}"
    res = run_seeds(NAME, _options(args), args.seeds, lambda seed, tmp: _seed(args, seed, data, tmp))
    seeds = list(res["seeds"].values())
    rec: list[dict] = []
    for arm, name in ARMS.items():
        for key in KEYS:
            rec.append({"table": "det", "arm": name, "metric": key, **_ms([s[arm][key] for s in seeds])})
    for key in ("map", "map_50"):
        diff = [s["co-detr"][key] - s["detr"][key] for s in seeds]
        rec.append(
            {"table": "det", "arm": "Co-DETR - Deformable DETR (per seed)", "metric": key, **_ms(diff)}
        )
    epochs = min(len(s[a]["curve"]) for s in seeds for a in ARMS) if seeds else 0
    for e in range(epochs):
        rec.append({"table": "curve", "epoch": e + 1,
                    **{f"{a.replace('-', '')}_{k}": v for a in ARMS
                       for k, v in _ms([s[a]["curve"][e] for s in seeds]).items()}})  # fmt: skip
    for arm in ARMS:
        rec.append({"table": "cost", "arm": arm, "parameters": seeds[0][arm]["parameters"] if seeds else 0,
                    **_ms([s[arm]["train_seconds"] for s in seeds])})  # fmt: skip
    if seeds:
        _plot(seeds, OUT_DIR / f"{NAME}.png")
    o = res["options"]
    notes = [
        f"{data}, {o['model']} at {o['size']} px, {o['epochs']} epochs (equal steps for both arms: batch 64), "
        f"AdamW lr {o['lr']} (cosine, 1 warm-up epoch), gradient clipping {o['clip_grad']}, {o['threads']} "
        f"thread(s); seeds {list(res['seeds'])} (mean ± sd); wall {res.get('wall_seconds', '?')} s.",
        "Both arms are the same detector (transformers' Deformable DETR, 2 + 2 layers, d_model = the pyramid "
        "width, 50 queries) with the same inference; Co-DETR adds, for training only, ATSS and Faster R-CNN "
        "heads on the encoder's output (loss weight decoder layers x lambda_2 = 4) and their positives as "
        "two extra decoder query groups (loss weight lambda_1 = 1). COCO metrics by torchmetrics' "
        "MeanAveragePrecision (pycocotools) on the validation canvases; the per-epoch table is val mAP50.",
        f"Convergence plot: bench/out/{NAME}.png (not committed; made by this suite).",
    ]
    tables = [
        Table(name="det", columns=[("detector", "{arm}"), ("val metric", "{metric}"), ("value", MEAN_SD)]),
        Table(
            name="curve",
            columns=[
                ("epoch", "{epoch}"),
                ("Deformable DETR mAP50", "{detr_mean:.3f} ± {detr_sd:.3f}"),
                ("Co-DETR mAP50", "{codetr_mean:.3f} ± {codetr_sd:.3f}"),
            ],
        ),
        COST_TABLE,
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

"""Dense prediction on generated canvases (issue 19), several seeds, every arm trained in this process
with the same data, model, epochs and seed:

  dense-seg:    semantic segmentation on ``canvas`` — the linear per-patch head vs UperNet over the
                simple feature pyramid, on the same plain ViT; then W8A8 of the UperNet run (mIoU before
                and after) and its ONNX export parity.
  dense-change: change detection on ``canvas-change`` — the siamese plain-ViT difference baseline
                (UperNet over |pyramid(A) - pyramid(B)|, cross-entropy) vs ChangeViT (detail CNN,
                feature injector, difference decoder, BCE + Dice) on the same ViT.

    python -m bench dense-seg             # the recorded run
    python -m bench dense-seg --quick     # smoke: one seed, 1 epoch, small sets

The result so far is saved after every arm to bench/out/partial/NAME.json (a cut-short run keeps it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import OUT_DIR, Output, Table, log

MODEL = "vitkit_micro_p4_16"
QUICK = {"seeds": [0], "epochs": 1, "train": 64, "val": 32}
SEG_ARMS = {"linear": {"head": "linear"}, "upernet": {"head": "upernet"}}
# ChangeViT's detail CNN at a quarter of the official widths (16/32/64 for 64/128/256): CPU scale
CHANGE_ARMS = {
    "siamese-upernet": {"task": "change"},
    "changevit": {"task": "change:head=changevit,detail_width=16"},
}


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train", type=int, default=1000, help="training canvases")
    p.add_argument("--val", type=int, default=300, help="validation canvases")
    p.add_argument("--size", type=int, default=64, help="canvas side (px)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=MODEL)


def _cfg(args, seed: int, task: str, data: str, **kw):
    from vitkit.train import TrainConfig

    return TrainConfig(
        model=args.model,
        img_size=args.size,
        task=task,
        data=data,
        epochs=args.epochs,
        lr=args.lr,
        warmup_epochs=min(1, args.epochs - 1),
        seed=seed,
        threads=args.threads,
        tensorboard=False,
        **kw,
    )


def _train(args, seed: int, task: str, data: str, out: Path, **kw) -> dict:
    from vitkit.api import train_model

    t0 = time.perf_counter()
    run = train_model(_cfg(args, seed, task, data, **kw), out, quiet=True)
    return {**run.metrics, "wall_seconds": time.perf_counter() - t0}


def _partial(name: str) -> Path:
    return OUT_DIR / "partial" / f"{name}.json"


def _load_partial(name: str, args) -> dict:
    p = _partial(name)
    if p.is_file():
        doc = json.loads(p.read_text())
        if doc.get("options") == _options(args):
            return doc
    return {"options": _options(args), "seeds": {}}


def _options(args) -> dict:
    return {k: getattr(args, k) for k in ("epochs", "train", "val", "size", "lr", "threads", "model")}


def _save_partial(name: str, res: dict) -> None:
    p = _partial(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=1))


KEEP_SEG = (
    "miou",
    "pixel_accuracy",
    "mean_accuracy",
    "per_class_iou",
    "train_seconds",
    "parameters",
    "wall_seconds",
)
KEEP_CHANGE = ("change_f1", "change_precision", "change_recall", "change_iou", "pixel_accuracy", "train_seconds",
               "parameters", "wall_seconds")  # fmt: skip


def seg(args) -> Output:
    from vitkit.stages.export import export_run
    from vitkit.stages.quantize import quantize_run

    data = f"canvas:size={args.size},train={args.train},val={args.val}"
    res = _load_partial("dense-seg", args)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            got = res["seeds"].setdefault(str(seed), {})
            for arm, kw in SEG_ARMS.items():
                if arm in got:
                    continue
                log(f"dense-seg seed {seed}: {arm}")
                out = Path(tmp) / f"{arm}-{seed}"
                m = _train(args, seed, "segmentation", data, out, **kw)
                got[arm] = {k: m[k] for k in KEEP_SEG}
                if arm == "upernet":
                    summary, _ = quantize_run(out, Path(tmp) / f"q-{seed}", w_bits=8, a_bits=8)
                    got[arm]["w8a8_miou"] = summary["quant_miou"]
                    doc = export_run(out, images=64).doc
                    got[arm]["onnx_max_abs_logit_diff"] = doc["max_abs_logit_diff"]
                _save_partial("dense-seg", res)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return _seg_report(res, data)


def _ms(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


MEAN_SD = "{mean:.4f} ± {sd:.4f} (n={n})"


def _seg_report(res: dict, data: str) -> Output:
    seeds = [s for s in res["seeds"].values() if all(a in s for a in SEG_ARMS)]
    rec: list[dict] = []
    for arm in SEG_ARMS:
        for key in ("miou", "pixel_accuracy", "mean_accuracy"):
            rec.append({"table": "seg", "arm": arm, "metric": key, **_ms([s[arm][key] for s in seeds])})
        rec.append({"table": "cost", "arm": arm, "parameters": seeds[0][arm]["parameters"],
                    **_ms([s[arm]["train_seconds"] for s in seeds])})  # fmt: skip
    diff = [s["upernet"]["miou"] - s["linear"]["miou"] for s in seeds]
    rec.append({"table": "seg", "arm": "upernet - linear (per seed)", "metric": "miou", **_ms(diff)})
    drop = [100 * (s["upernet"]["miou"] - s["upernet"]["w8a8_miou"]) for s in seeds]
    rec.append({"table": "quant", "what": "W8A8 (minmax) mIoU drop, points", **_ms(drop)})
    rec.append({"table": "quant", "what": "ONNX max |logit diff| (fp32)",
                **_ms([s["upernet"]["onnx_max_abs_logit_diff"] for s in seeds])})  # fmt: skip
    o = res["options"]
    notes = [
        f"{data}, {o['model']} at {o['size']} px, {o['epochs']} epochs, lr {o['lr']}, {o['threads']} threads; "
        f"seeds {[k for k, s in res['seeds'].items() if all(a in s for a in SEG_ARMS)]} (mean ± sd); wall "
        f"{res.get('wall_seconds', '?')} s. Every arm: the same ViT, data, seed and epochs; only the head differs.",
    ]
    tables = [
        Table(name="seg", columns=[("arm", "{arm}"), ("val metric", "{metric}"), ("value", MEAN_SD)]),
        Table(
            name="cost",
            columns=[
                ("arm", "{arm}"),
                ("parameters", "{parameters:,}"),
                ("train seconds", "{mean:.0f} ± {sd:.0f}"),
            ],
        ),
        Table(name="quant", columns=[("UperNet run", "{what}"), ("value", "{mean:.4g} ± {sd:.2g} (n={n})")]),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)


def change(args) -> Output:
    data = f"canvas-change:size={args.size},train={args.train},val={args.val}"
    res = _load_partial("dense-change", args)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            got = res["seeds"].setdefault(str(seed), {})
            for arm, kw in CHANGE_ARMS.items():
                if arm in got:
                    continue
                log(f"dense-change seed {seed}: {arm}")
                kw = dict(kw)
                task = kw.pop("task")
                m = _train(args, seed, task, data, Path(tmp) / f"{arm}-{seed}", **kw)
                got[arm] = {k: m[k] for k in KEEP_CHANGE}
                _save_partial("dense-change", res)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    seeds = [s for s in res["seeds"].values() if all(a in s for a in CHANGE_ARMS)]
    rec = []
    for arm in CHANGE_ARMS:
        for key in ("change_f1", "change_iou", "change_precision", "change_recall"):
            rec.append({"table": "change", "arm": arm, "metric": key, **_ms([s[arm][key] for s in seeds])})
        rec.append({"table": "cost", "arm": arm, "parameters": seeds[0][arm]["parameters"],
                    **_ms([s[arm]["train_seconds"] for s in seeds])})  # fmt: skip
    arms = list(CHANGE_ARMS)
    for other in arms[1:]:
        diff = [s[other]["change_f1"] - s[arms[0]]["change_f1"] for s in seeds]
        rec.append(
            {"table": "change", "arm": f"{other} - {arms[0]} (per seed)", "metric": "change_f1", **_ms(diff)}
        )
    o = res["options"]
    notes = [
        f"{data}, {o['model']} at {o['size']} px, {o['epochs']} epochs, lr {o['lr']}, {o['threads']} threads; "
        f"seeds {[k for k, s in res['seeds'].items() if all(a in s for a in CHANGE_ARMS)]} (mean ± sd); wall "
        f"{res.get('wall_seconds', '?')} s.",
    ]
    tables = [
        Table(name="change", columns=[("arm", "{arm}"), ("val metric", "{metric}"), ("value", MEAN_SD)]),
        Table(
            name="cost",
            columns=[
                ("arm", "{arm}"),
                ("parameters", "{parameters:,}"),
                ("train seconds", "{mean:.0f} ± {sd:.0f}"),
            ],
        ),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

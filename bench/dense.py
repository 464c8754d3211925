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


def _load_partial(name: str, options: dict) -> dict:
    p = _partial(name)
    if p.is_file():
        doc = json.loads(p.read_text())
        if doc.get("options") == options:
            return doc
    return {"options": options, "seeds": {}}


def run_arms(
    name: str,
    args,
    arms: dict[str, dict],
    data: str,
    keep: tuple[str, ...],
    *,
    options: dict | None = None,
    after=None,
) -> tuple[dict, list[dict]]:
    """Train every arm (TrainConfig fields; ``task`` defaults to segmentation) for every seed into a
    temporary run, keeping the ``keep`` metrics; resumes from and saves to bench/out/partial/NAME.json
    after every arm. ``after(arm, run_dir, tmp, seed, row)`` adds measurements of a trained run.
    Returns the result and the seeds every arm completed."""
    res = _load_partial(name, options or _options(args))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            got = res["seeds"].setdefault(str(seed), {})
            for arm, kw in arms.items():
                if arm in got:
                    continue
                log(f"{name} seed {seed}: {arm}")
                kw = dict(kw)
                task = kw.pop("task", "segmentation")
                out = Path(tmp) / f"{arm}-{seed}"
                m = _train(args, seed, task, data, out, **kw)
                got[arm] = {k: m[k] for k in keep}
                if after is not None:
                    after(arm, out, Path(tmp), seed, got[arm])
                _save_partial(name, res)
    res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return res, [s for s in res["seeds"].values() if all(a in s for a in arms)]


def run_seeds(name: str, options: dict, seeds: list[int], one_seed) -> dict:
    """``one_seed(seed, tmp) -> row`` for every seed not yet in bench/out/partial/NAME.json (same
    options), saving after each; the result with its wall time (this call's)."""
    res = _load_partial(name, options)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            if str(seed) in res["seeds"]:
                continue
            log(f"{name} seed {seed}")
            res["seeds"][str(seed)] = one_seed(seed, Path(tmp))
            _save_partial(name, res)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def complete_seeds(res: dict, arms: dict) -> list[str]:
    return [k for k, s in res["seeds"].items() if all(a in s for a in arms)]


def arm_records(table: str, arms: dict, seeds: list[dict], metrics: tuple[str, ...]) -> list[dict]:
    """Per arm: one row per metric (mean ± sd over seeds) in ``table``, and its cost row."""
    rec: list[dict] = []
    for arm in arms:
        for key in metrics:
            rec.append({"table": table, "arm": arm, "metric": key, **_ms([s[arm][key] for s in seeds])})
        rec.append({"table": "cost", "arm": arm, "parameters": seeds[0][arm]["parameters"],
                    **_ms([s[arm]["train_seconds"] for s in seeds])})  # fmt: skip
    return rec


COST_TABLE = Table(
    name="cost",
    columns=[("arm", "{arm}"), ("parameters", "{parameters:,}"), ("train seconds", "{mean:.0f} ± {sd:.0f}")],
)


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

    def quantize_and_export(arm: str, out: Path, tmp: Path, seed: int, row: dict) -> None:
        if arm == "upernet":
            summary, _ = quantize_run(out, tmp / f"q-{seed}", w_bits=8, a_bits=8)
            row["w8a8_miou"] = summary["quant_miou"]
            row["onnx_max_abs_logit_diff"] = export_run(out, images=64).doc["max_abs_logit_diff"]

    data = f"canvas:size={args.size},train={args.train},val={args.val}"
    res, seeds = run_arms("dense-seg", args, SEG_ARMS, data, KEEP_SEG, after=quantize_and_export)
    return _seg_report(res, seeds, data)


def _ms(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


MEAN_SD = "{mean:.4f} ± {sd:.4f} (n={n})"


def _seg_report(res: dict, seeds: list[dict], data: str) -> Output:
    rec = arm_records("seg", SEG_ARMS, seeds, ("miou", "pixel_accuracy", "mean_accuracy"))
    diff = [s["upernet"]["miou"] - s["linear"]["miou"] for s in seeds]
    rec.append({"table": "seg", "arm": "upernet - linear (per seed)", "metric": "miou", **_ms(diff)})
    drop = [100 * (s["upernet"]["miou"] - s["upernet"]["w8a8_miou"]) for s in seeds]
    rec.append({"table": "quant", "what": "W8A8 (minmax) mIoU drop, points", **_ms(drop)})
    rec.append({"table": "quant", "what": "ONNX max |logit diff| (fp32)",
                **_ms([s["upernet"]["onnx_max_abs_logit_diff"] for s in seeds])})  # fmt: skip
    o = res["options"]
    notes = [
        f"{data}, {o['model']} at {o['size']} px, {o['epochs']} epochs, lr {o['lr']}, {o['threads']} threads; "
        f"seeds {complete_seeds(res, SEG_ARMS)} (mean ± sd); wall "
        f"{res.get('wall_seconds', '?')} s. Every arm: the same ViT, data, seed and epochs; only the head differs.",
    ]
    tables = [
        Table(name="seg", columns=[("arm", "{arm}"), ("val metric", "{metric}"), ("value", MEAN_SD)]),
        COST_TABLE,
        Table(name="quant", columns=[("UperNet run", "{what}"), ("value", "{mean:.4g} ± {sd:.2g} (n={n})")]),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)


def change(args) -> Output:
    data = f"canvas-change:size={args.size},train={args.train},val={args.val}"
    res, seeds = run_arms("dense-change", args, CHANGE_ARMS, data, KEEP_CHANGE)
    rec = arm_records(
        "change", CHANGE_ARMS, seeds, ("change_f1", "change_iou", "change_precision", "change_recall")
    )
    arms = list(CHANGE_ARMS)
    for other in arms[1:]:
        diff = [s[other]["change_f1"] - s[arms[0]]["change_f1"] for s in seeds]
        rec.append(
            {"table": "change", "arm": f"{other} - {arms[0]} (per seed)", "metric": "change_f1", **_ms(diff)}
        )
    o = res["options"]
    notes = [
        f"{data}, {o['model']} at {o['size']} px, {o['epochs']} epochs, lr {o['lr']}, {o['threads']} threads; "
        f"seeds {complete_seeds(res, CHANGE_ARMS)} (mean ± sd); wall "
        f"{res.get('wall_seconds', '?')} s.",
    ]
    tables = [
        Table(name="change", columns=[("arm", "{arm}"), ("val metric", "{metric}"), ("value", MEAN_SD)]),
        COST_TABLE,
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

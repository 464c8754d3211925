"""Distillation on Fashion-MNIST-LT (ρ = 100: 6,000 → 60 images per class; the balanced 10k test set)
at 32 px, everything trained in this process:

* part ``lt``: one CNN teacher trained once on the long-tailed data (at 28 px, its own lower
  resolution; class-balanced sampling), then per seed, interleaved, the same small ViT trained for
  the same epochs as: a plain ViT (CE), DeiT (hard distillation), DeiT-LT (OOD hard distillation,
  strong augmentation, DRW of the DIST loss) and optionally (``--variants ... deit-lt-mildaug``)
  DeiT-LT without the strong augmentation. Reports
  overall, balanced and head/mid/tail accuracy ([0:3], [3:7], [7:10], DeiT-LT's CIFAR-10 groups,
  which these counts reproduce) of the CLS head, the DIST head and their mean; the plain ViT also
  with post-hoc logit adjustment (τ = 1).
* part ``feature``: a bigger ViT teacher trained once on *balanced* Fashion-MNIST (cached in
  ``--out``/vit-teacher); per seed the small ViT trained on the LT data with CE only, with G2SD's
  generic feature loss (joint with CE), and with ScaleKD (CAP + dual-view + logit KD).

Students: the micro preset with patch 8 at 32 px (16 tokens), batch 16 by default. The 2026-11-25
results (RESULTS.md) ran the two parts as two processes, then merged them:

    python bench/distill_lt.py --part lt --train-size 6000 --val-size 2000 --epochs 4 --teacher-epochs 8 --out O1
    python bench/distill_lt.py --part feature --train-size 6000 --val-size 2000 --feature-epochs 4 \
        --feature-teacher-train-size 6000 --feature-teacher-epochs 4 --out O2
    python bench/distill_lt.py --report O1/results.json O2/results.json --out O3

Writes ``results.json``, ``results.md`` and ``heads.png`` into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from vitkit.api import train_model
from vitkit.data import load_splits
from vitkit.distill.run import distill
from vitkit.distill.sam import SAMObjective
from vitkit.train import TrainConfig, classification_metrics, predict
from vitkit.train.longtail import logit_adjust

GROUPS = {"head": slice(0, 3), "mid": slice(3, 7), "tail": slice(7, 10)}


def group_acc(per_class: list[float]) -> dict[str, float]:
    pc = np.asarray(per_class, dtype=float)
    return {g: float(pc[s].mean()) for g, s in GROUPS.items()}


def summarize(m: dict) -> dict:
    return {"top1": m["top1"], "balanced": m["balanced_accuracy"], **group_acc(m["per_class_accuracy"])}


def student_cfg(args, seed: int, **kw) -> TrainConfig:
    base = dict(
        model="vitkit_micro_distilled_p4_16",
        img_size=args.img_size,
        # patch 8 at 32 px keeps the micro preset's 16 tokens (and cost) at the resolution
        model_kwargs={"patch_size": args.student_patch},
        data="fashion-mnist",
        longtail=100,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        warmup_epochs=min(1, args.epochs / 2),
        scale_min=0.8,
        translate=0.1,
        hflip=0.5,
        seed=seed,
        eval_every=1000,
        tensorboard=False,
        threads=args.threads,
    )
    base.update(kw)
    return TrainConfig(**base)


def run_lt(args, data, out: Path, results: dict) -> None:
    counts = data.train.class_counts()
    assert counts == sorted(counts, reverse=True), counts
    t0 = time.perf_counter()
    teacher_dir = Path(args.teacher_run) if args.teacher_run else out / "teacher"
    if args.teacher_run or (teacher_dir / "metrics.json").exists():  # reuse an earlier run's teacher
        from vitkit.runs import load

        tmodel = load(teacher_dir)
        tm = classification_metrics(predict(tmodel, data.val), data.val.targets)
        results["lt"]["teacher"] = {"model": str(teacher_dir), "seconds": 0.0, **summarize(tm)}
    else:
        _train_teacher(args, data, teacher_dir, results, t0)
    print("teacher", results["lt"]["teacher"], flush=True)
    _run_students(args, data, out, results, teacher_dir)


def _train_teacher(args, data, teacher_dir: Path, results: dict, t0: float) -> None:
    teacher = train_model(
        TrainConfig(
            model=args.teacher,
            img_size=28,
            data="fashion-mnist",
            longtail=100,
            epochs=args.teacher_epochs,
            batch_size=128,
            lr=2e-3,
            warmup_epochs=min(1, args.teacher_epochs / 2),
            scale_min=0.8,
            translate=0.1,
            hflip=0.5,
            sampler="balanced",
            eval_every=1000,
            tensorboard=False,
            threads=args.threads,
        ),
        teacher_dir,
        # DeiT-LT trains its teachers with SAM (outside its repository): --teacher-sam RHO
        objective=SAMObjective(rho=args.teacher_sam) if args.teacher_sam else None,
        data=data,
        force=True,
        quiet=True,
    )
    results["lt"]["teacher"] = {
        "model": args.teacher,
        "sam_rho": args.teacher_sam,
        "seconds": round(time.perf_counter() - t0, 1),
        **summarize(teacher.metrics),
    }


def _run_students(args, data, out: Path, results: dict, teacher_dir: Path) -> None:
    counts = data.train.class_counts()
    for seed in args.seeds:
        for variant in args.variants:
            t0 = time.perf_counter()
            dst = out / f"{variant}-s{seed}"
            if variant == "plain":
                cfg = student_cfg(args, seed, model="vitkit_micro_p4_16")
                run = train_model(cfg, dst, data=data, force=True, quiet=True)
                row = {"mean": summarize(run.metrics)}
                logits = predict(run.model, data.val)
                la = classification_metrics(logit_adjust(logits, counts, 1.0), data.val.targets)
                row["mean+LA"] = summarize(la)
            else:
                method = "deit" if variant == "deit" else "deit-lt"
                cfg = student_cfg(args, seed)
                if variant == "deit-lt-mildaug":
                    # the DeiT-LT loss and DRW without the strong augmentation (explicit fields win)
                    cfg = student_cfg(args, seed, randaug=None, mixup=0.0, cutmix=0.0, reprob=0.0)
                run = distill(cfg, dst, teacher=teacher_dir, method=method, data=data, force=True, quiet=True)
                row = {h: summarize(run.metrics["heads"][h]) for h in ("cls", "dist", "mean")}
            row["steps"] = _steps(cfg, len(data.train))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results["lt"].setdefault(variant, []).append(row)
            print(variant, seed, json.dumps(row), flush=True)
            _save(out, results)


def _steps(cfg: TrainConfig, n: int) -> int:
    return cfg.epochs * math.ceil(n / cfg.batch_size)


def _feature_teacher(args, data, out: Path, results: dict) -> Path:
    """The ViT teacher: trained once on a balanced Fashion-MNIST subset (not the LT data), cached in
    ``out/vit-teacher`` and reused by later runs of the script (``--feature-teacher-run`` names
    another); evaluated on the students' validation set."""
    from vitkit.runs import load

    tdir = Path(args.feature_teacher_run) if args.feature_teacher_run else out / "vit-teacher"
    t0 = time.perf_counter()
    if (tdir / "metrics.json").exists():
        tmodel = load(tdir)
    else:
        balanced = load_splits(
            "fashion-mnist", train_size=args.feature_teacher_train_size, val_size=args.val_size
        )
        tcfg = TrainConfig(
            model=args.feature_teacher,
            img_size=args.img_size,
            model_kwargs={"patch_size": args.feature_teacher_patch},
            data="fashion-mnist",
            train_size=args.feature_teacher_train_size,
            epochs=args.feature_teacher_epochs,
            batch_size=64,
            lr=1e-3,
            warmup_epochs=min(1, args.feature_teacher_epochs / 2),
            scale_min=0.8,
            translate=0.1,
            hflip=0.5,
            eval_every=1000,
            tensorboard=False,
            threads=args.threads,
        )
        tmodel = train_model(tcfg, tdir, data=balanced, force=True, quiet=True).model
    tm = classification_metrics(predict(tmodel, data.val), data.val.targets)
    results["feature"]["teacher"] = {
        "model": f"{args.feature_teacher} (patch {args.feature_teacher_patch}) at {tdir}",
        "trained_on": f"balanced Fashion-MNIST, {args.feature_teacher_train_size} images",
        "seconds": round(time.perf_counter() - t0, 1),
        **summarize(tm),
    }
    return tdir


def run_feature(args, data, out: Path, results: dict) -> None:
    tdir = _feature_teacher(args, data, out, results)
    print("vit teacher", results["feature"]["teacher"], flush=True)
    for seed in args.seeds:
        for variant in ("ce", "g2sd", "scalekd"):
            t0 = time.perf_counter()
            cfg = student_cfg(
                args,
                seed,
                model="vitkit_micro_p4_16",
                epochs=args.feature_epochs,
                warmup_epochs=min(1, args.feature_epochs / 2),
            )
            dst = out / f"feat-{variant}-s{seed}"
            if variant == "ce":
                run = train_model(cfg, dst, data=data, force=True, quiet=True)
            else:
                run = distill(cfg, dst, teacher=tdir, method=variant, data=data, force=True, quiet=True)
            row = {
                **summarize(run.metrics),
                "steps": _steps(cfg, len(data.train)),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results["feature"].setdefault(variant, []).append(row)
            print("feature", variant, seed, json.dumps(row), flush=True)
            _save(out, results)


def _save(out: Path, results: dict) -> None:
    from vitkit.io import write_json, write_text

    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown(results) + "\n" + per_seed_table(results))


def _ms(values: list[float]) -> str:
    a = 100 * np.asarray(values, dtype=float)
    return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}"


def markdown(results: dict) -> str:
    lines = [f"machine: {results['machine']}; load before: {results['uptime']}", ""]
    lt = results.get("lt", {})
    if lt.get("teacher"):
        t = lt["teacher"]
        lines += [
            f"LT teacher {t['model']}: top1 {100 * t['top1']:.1f}, balanced {100 * t['balanced']:.1f}, "
            f"head/mid/tail {100 * t['head']:.1f}/{100 * t['mid']:.1f}/{100 * t['tail']:.1f} ({t['seconds']} s)",
            "",
            "| student | predictor | top-1 | balanced | head [0:3] | mid [3:7] | tail [7:10] |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in ("plain", "deit", "deit-lt", "deit-lt-mildaug"):
            rows = lt.get(variant, [])
            if not rows:
                continue
            for pred in rows[0]:
                if pred in ("seconds", "steps"):
                    continue
                vals = [r[pred] for r in rows]
                cells = [_ms([v[k] for v in vals]) for k in ("top1", "balanced", "head", "mid", "tail")]
                lines.append(f"| {variant} (n={len(rows)}) | {pred} | " + " | ".join(cells) + " |")
    feat = results.get("feature", {})
    if feat.get("teacher"):
        t = feat["teacher"]
        lines += [
            "",
            f"ViT teacher {t['model']}: top1 {100 * t['top1']:.1f}, balanced {100 * t['balanced']:.1f} ({t['seconds']} s)",
            "",
            "| student | top-1 | balanced | head | mid | tail | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in ("ce", "g2sd", "scalekd"):
            rows = feat.get(variant, [])
            if rows:
                cells = [_ms([r[k] for r in rows]) for k in ("top1", "balanced", "head", "mid", "tail")]
                secs = np.mean([r["seconds"] for r in rows])
                lines.append(f"| {variant} (n={len(rows)}) | " + " | ".join(cells) + f" | {secs:.0f} |")
    claims = claim_rows(results)
    if claims:
        lines += [
            "",
            "Paired per-seed differences (percentage points; seed order as run):",
            "",
            "| claim | per seed | mean ± sd | holds on |",
            "|---|---|---|---|",
        ]
        for name, diffs in claims:
            per = " / ".join(f"{100 * d:+.1f}" for d in diffs)
            holds = sum(d > 0 for d in diffs) if "≥" not in name else sum(d >= 0 for d in diffs)
            lines.append(f"| {name} | {per} | {_ms(diffs)} | {holds}/{len(diffs)} seeds |")
    return "\n".join(lines) + "\n"


def _get(rows: list[dict], pred: str | None, key: str) -> list[float]:
    return [(r[pred] if pred else r)[key] for r in rows]


def claim_rows(results: dict) -> list[tuple[str, list[float]]]:
    """The issue's claims as paired per-seed differences (a − b) over the seeds both rows have."""
    lt, feat = results.get("lt", {}), results.get("feature", {})
    pairs = [
        ("DeiT-LT mean − plain ViT: balanced", ("deit-lt", "mean"), ("plain", "mean"), "balanced"),
        ("DeiT-LT mean − plain ViT: tail", ("deit-lt", "mean"), ("plain", "mean"), "tail"),
        ("DeiT-LT DIST − plain ViT: tail", ("deit-lt", "dist"), ("plain", "mean"), "tail"),
        ("DeiT-LT mean − plain ViT + LA: balanced", ("deit-lt", "mean"), ("plain", "mean+LA"), "balanced"),
        ("DeiT (hard) mean − plain ViT: balanced", ("deit", "mean"), ("plain", "mean"), "balanced"),
        ("DeiT-LT: DIST − CLS on tail", ("deit-lt", "dist"), ("deit-lt", "cls"), "tail"),
        ("DeiT-LT: CLS − DIST on head (≥)", ("deit-lt", "cls"), ("deit-lt", "dist"), "head"),
    ]
    out = []
    for name, (va, pa), (vb, pb), key in pairs:
        a, b = lt.get(va, []), lt.get(vb, [])
        n = min(len(a), len(b))
        if n:
            out.append((name, [x - y for x, y in zip(_get(a[:n], pa, key), _get(b[:n], pb, key))]))
    for v in ("g2sd", "scalekd"):
        a, b = feat.get(v, []), feat.get("ce", [])
        n = min(len(a), len(b))
        if n:
            d = [x - y for x, y in zip(_get(a[:n], None, "balanced"), _get(b[:n], None, "balanced"))]
            out.append((f"{v} − CE student: balanced (≥)", d))
    return out


def per_seed_table(results: dict) -> str:
    """Balanced accuracy of every run, seed by seed."""
    lines = [
        "| run | predictor | balanced accuracy per seed | steps | seconds per run |",
        "|---|---|---|---|---|",
    ]
    for part in ("lt", "feature"):
        for variant, rows in results.get(part, {}).items():
            if variant == "teacher" or not rows:
                continue
            preds = [p for p in rows[0] if isinstance(rows[0][p], dict)] or [None]
            for pred in preds:
                vals = " / ".join(f"{100 * v:.1f}" for v in _get(rows, pred, "balanced"))
                secs = np.mean([r["seconds"] for r in rows])
                lines.append(
                    f"| {variant} | {pred or 'model'} | {vals} | {rows[0].get('steps', '?')} | {secs:.0f} |"
                )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lt = results.get("lt", {})
    bars = []
    for variant in ("plain", "deit", "deit-lt", "deit-lt-mildaug"):
        for pred in ("mean", "mean+LA", "cls", "dist"):
            rows = lt.get(variant, [])
            if rows and pred in rows[0]:
                bars.append((f"{variant}\n{pred}", [np.mean([r[pred][g] for r in rows]) for g in GROUPS]))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4))
    w = 0.27
    for i, g in enumerate(GROUPS):
        ax.bar(np.arange(len(bars)) + (i - 1) * w, [100 * b[1][i] for b in bars], w, label=g)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Fashion-MNIST-LT (ρ=100), 32 px: head / mid / tail accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths: list[str], out: Path) -> None:
    """One results.md / heads.png from the results.json of separate runs (e.g. part lt and part
    feature run as two processes)."""
    merged: dict = {}
    for path in paths:
        r = json.loads(Path(path).read_text())
        for key, value in r.items():
            if key in ("lt", "feature"):
                merged.setdefault(key, {}).update(value)
            elif key not in merged:
                merged[key] = value
    out.mkdir(parents=True, exist_ok=True)
    _save(out, merged)
    plot(merged, out / "heads.png")
    print(markdown(merged) + "\n" + per_seed_table(merged))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="lt,feature")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="students (the teachers use 128 / 64)")
    p.add_argument(
        "--student-patch", type=int, default=8, help="students' patch size (8 at 32 px: 16 tokens)"
    )
    p.add_argument("--teacher", default="resnet10t")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument(
        "--teacher-sam", type=float, default=None, help="part lt: train the CNN teacher with SAM (rho)"
    )
    p.add_argument("--teacher-run", default=None, help="part lt: reuse this trained teacher run directory")
    p.add_argument("--img-size", type=int, default=32, help="part lt: student input side")
    p.add_argument("--feature-teacher", default="vitkit_tiny_p4_32")
    p.add_argument("--feature-teacher-patch", type=int, default=8)
    p.add_argument("--feature-teacher-epochs", type=int, default=3)
    p.add_argument(
        "--feature-teacher-train-size", type=int, default=12000, help="balanced Fashion-MNIST images"
    )
    p.add_argument("--feature-teacher-run", default=None, help="part feature: reuse this trained ViT teacher")
    p.add_argument("--feature-epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=None, help="stratified subsample of the LT training set")
    p.add_argument("--val-size", type=int, default=None, help="stratified subsample of the 10k test set")
    p.add_argument(
        "--variants", nargs="+", default=["plain", "deit", "deit-lt"], help="part lt (also: deit-lt-mildaug)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/out/distill_lt")
    p.add_argument(
        "--report", nargs="+", default=None, help="merge these results.json files into --out; no training"
    )
    args = p.parse_args()
    if args.report:
        report(args.report, Path(args.out))
        return
    os.environ.setdefault("VITKIT_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_splits("fashion-mnist", longtail=100, train_size=args.train_size, val_size=args.val_size)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "args": vars(args),
        "train_size": len(data.train),
        "val_size": len(data.val),
        "train_class_counts": data.train.class_counts(),
        "lt": {},
        "feature": {},
    }
    parts = args.part.split(",")
    if "lt" in parts:
        run_lt(args, data, out, results)
    if "feature" in parts:
        run_feature(args, data, out, results)
    results["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    _save(out, results)
    plot(results, out / "heads.png")
    print(markdown(results))


if __name__ == "__main__":
    main()

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

Students: the micro preset with patch 8 at 32 px (16 tokens), batch 32 by default. The two parts are
two suites (the 2026-11-25 results in bench/HISTORY.md used these settings):

    python -m bench distill-lt --train-size 6000 --val-size 2000 --epochs 4 --teacher-epochs 8
    python -m bench distill-feature --train-size 6000 --val-size 2000 --feature-epochs 4 \
        --feature-teacher-train-size 6000 --feature-teacher-epochs 4

Trained runs, the teachers (reused by later runs), ``results.json`` (saved after every run) and
``heads.png`` go to ``--work`` (default bench/out/distill_lt/).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import OUT_DIR, ROOT, Output, Table, log
from vitkit.api import train_model
from vitkit.data import load_splits
from vitkit.stages.distill import distill
from vitkit.train import SAM, TrainConfig, classification_metrics, predict
from vitkit.train.longtail import logit_adjust

QUICK = {"seeds": [0], "epochs": 1, "teacher_epochs": 1, "feature_teacher_epochs": 1, "feature_epochs": 1,
         "train_size": 300, "val_size": 200, "feature_teacher_train_size": 300, "variants": ["plain", "deit"]}  # fmt: skip


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="students (the teachers use 128 / 64)")
    p.add_argument(
        "--student-patch", type=int, default=8, help="students' patch size (8 at 32 px: 16 tokens)"
    )
    p.add_argument("--teacher", default="resnet10t")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument(
        "--teacher-sam", type=float, default=None, help="distill-lt: train the CNN teacher with SAM (rho)"
    )
    p.add_argument("--teacher-run", default=None, help="distill-lt: reuse this trained teacher run directory")
    p.add_argument("--img-size", type=int, default=32, help="student input side")
    p.add_argument("--feature-teacher", default="vitkit_tiny_p4_32")
    p.add_argument("--feature-teacher-patch", type=int, default=8)
    p.add_argument("--feature-teacher-epochs", type=int, default=3)
    p.add_argument(
        "--feature-teacher-train-size", type=int, default=12000, help="balanced Fashion-MNIST images"
    )
    p.add_argument(
        "--feature-teacher-run", default=None, help="distill-feature: reuse this trained ViT teacher"
    )
    p.add_argument("--feature-epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=None, help="stratified subsample of the LT training set")
    p.add_argument("--val-size", type=int, default=None, help="stratified subsample of the 10k test set")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "deit", "deit-lt"],
        help="distill-lt (also: deit-lt-mildaug)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--work",
        type=Path,
        default=OUT_DIR / "distill_lt",
        help="runs, cached teachers, results.json, heads.png",
    )


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
        results["lt"]["teacher"] = {"model": _shown(teacher_dir), "seconds": 0.0, **summarize(tm)}
    else:
        _train_teacher(args, data, teacher_dir, results, t0)
    log(f"teacher {results['lt']['teacher']}")
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
        callbacks=[SAM(rho=args.teacher_sam)] if args.teacher_sam else (),
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
            log(f"{variant} {seed} {json.dumps(row)}")
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
        "model": f"{args.feature_teacher} (patch {args.feature_teacher_patch}) at {_shown(tdir)}",
        "trained_on": f"balanced Fashion-MNIST, {args.feature_teacher_train_size} images",
        "seconds": round(time.perf_counter() - t0, 1),
        **summarize(tm),
    }
    return tdir


def run_feature(args, data, out: Path, results: dict) -> None:
    tdir = _feature_teacher(args, data, out, results)
    log(f"vit teacher {results['feature']['teacher']}")
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
            log(f"feature {variant} {seed} {json.dumps(row)}")
            _save(out, results)


def _save(out: Path, results: dict) -> None:
    from vitkit.io import write_json

    write_json(out / "results.json", results)  # after every run: a cut-short run keeps what it measured


def _ms(values: list[float]) -> dict:
    a = 100 * np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def _ms_fields(values: list[float], key: str) -> dict:
    m = _ms(values)
    return {key: m["mean"], f"{key}_sd": m["sd"]}


ACC = ("top1", "balanced", "head", "mid", "tail")


def _acc_columns() -> list[tuple[str, str]]:
    names = {
        "top1": "top-1",
        "balanced": "balanced",
        "head": "head [0:3]",
        "mid": "mid [3:7]",
        "tail": "tail [7:10]",
    }
    return [(names[k], f"{{{k}:.1f}} ± {{{k}_sd:.1f}}") for k in ACC]


def lt_records(results: dict) -> tuple[list[dict], list[str]]:
    lt, rec, notes = results.get("lt", {}), [], []
    if lt.get("teacher"):
        t = lt["teacher"]
        notes.append(f"LT teacher {t['model']}: top-1 {100 * t['top1']:.1f}, balanced {100 * t['balanced']:.1f}, "
                     f"head/mid/tail {100 * t['head']:.1f}/{100 * t['mid']:.1f}/{100 * t['tail']:.1f} ({t['seconds']} s).")  # fmt: skip
    for variant in ("plain", "deit", "deit-lt", "deit-lt-mildaug"):
        rows = lt.get(variant, [])
        for pred in rows[0] if rows else []:
            if pred in ("seconds", "steps"):
                continue
            row = {"table": "students", "student": f"{variant} (n={len(rows)})", "predictor": pred}
            for k in ACC:
                row.update(_ms_fields([r[pred][k] for r in rows], k))
            rec.append(row)
    return rec, notes


def _shown(path: Path) -> str:
    """A run folder as a record shows it: relative to the checkout (records made in a /tmp worktree
    would otherwise name a /tmp path no reader has)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def feature_records(results: dict) -> tuple[list[dict], list[str]]:
    feat, rec, notes = results.get("feature", {}), [], []
    if feat.get("teacher"):
        t = feat["teacher"]
        notes.append(f"ViT teacher {t['model']} ({t['trained_on']}): top-1 {100 * t['top1']:.1f}, balanced "
                     f"{100 * t['balanced']:.1f} ({t['seconds']} s).")  # fmt: skip
    for variant in ("ce", "g2sd", "scalekd"):
        rows = feat.get(variant, [])
        if rows:
            row = {"table": "students", "student": f"{variant} (n={len(rows)})",
                   "seconds": float(np.mean([r["seconds"] for r in rows]))}  # fmt: skip
            for k in ACC:
                row.update(_ms_fields([r[k] for r in rows], k))
            rec.append(row)
    return rec, notes


def claim_records(results: dict) -> list[dict]:
    out = []
    for name, diffs in claim_rows(results):
        holds = sum(d > 0 for d in diffs) if "≥" not in name else sum(d >= 0 for d in diffs)
        out.append({"table": "claims", "claim": name, "per_seed": " / ".join(f"{100 * d:+.1f}" for d in diffs),
                    **_ms_fields(diffs, "diff"), "holds": holds, "n": len(diffs)})  # fmt: skip
    return out


CLAIMS = Table(name="claims", title="Paired per-seed differences (percentage points; seed order as run)",
               columns=[("claim", "{claim}"), ("per seed", "{per_seed}"), ("mean ± sd", "{diff:+.1f} ± {diff_sd:.1f}"),
                        ("holds on", "{holds}/{n} seeds")])  # fmt: skip
PER_SEED = Table(name="per_seed", title="Balanced accuracy of every run, seed by seed",
                 columns=[("run", "{run}"), ("predictor", "{predictor}"), ("balanced accuracy per seed", "{per_seed}"),
                          ("steps", "{steps}"), ("seconds per run", "{seconds:.0f}")])  # fmt: skip


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


def per_seed_records(results: dict, part: str) -> list[dict]:
    """Balanced accuracy of every run, seed by seed."""
    out = []
    for variant, rows in results.get(part, {}).items():
        if variant == "teacher" or not rows:
            continue
        preds = [p for p in rows[0] if isinstance(rows[0][p], dict)] or [None]
        for pred in preds:
            out.append({"table": "per_seed", "run": variant, "predictor": pred or "model",
                        "per_seed": " / ".join(f"{100 * v:.1f}" for v in _get(rows, pred, "balanced")),
                        "steps": rows[0].get("steps"), "seconds": float(np.mean([r["seconds"] for r in rows]))})  # fmt: skip
    return out


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


def _start(args, part: str) -> tuple[object, Path, dict, tempfile.TemporaryDirectory | None]:
    torch.set_num_threads(args.threads)
    # --quick trains throw-away runs: a temporary folder, so the cached teachers of real runs stay
    tmp = tempfile.TemporaryDirectory() if args.quick else None
    out = Path(tmp.name) if tmp else args.work
    out.mkdir(parents=True, exist_ok=True)
    data = load_splits("fashion-mnist", longtail=100, train_size=args.train_size, val_size=args.val_size)
    results = {"part": part, "train_size": len(data.train), "val_size": len(data.val),
               "train_class_counts": data.train.class_counts(), "lt": {}, "feature": {}}  # fmt: skip
    return data, out, results, tmp


def _data_note(args, results: dict) -> str:
    return (f"Fashion-MNIST-LT (ρ = 100), {results['train_size']} training images (class counts "
            f"{results['train_class_counts']}), {results['val_size']} balanced validation images; students "
            f"{args.img_size} px, patch {args.student_patch}, batch {args.batch_size}; seeds {args.seeds}; "
            f"{args.threads} thread(s). Accuracies in %, mean ± sd over seeds.")  # fmt: skip


def lt(args) -> Output:
    data, out, results, tmp = _start(args, "lt")
    try:
        run_lt(args, data, out, results)
        _save(out, results)
        plot(results, out / "heads.png")
    finally:
        if tmp:
            tmp.cleanup()
    rec, notes = lt_records(results)
    rec += claim_records(results) + per_seed_records(results, "lt")
    students = Table(
        name="students", columns=[("student", "{student}"), ("predictor", "{predictor}"), *_acc_columns()]
    )
    return Output(records=rec, tables=[students, CLAIMS, PER_SEED], notes=[_data_note(args, results), *notes],
                  extra=results)  # fmt: skip


def feature(args) -> Output:
    data, out, results, tmp = _start(args, "feature")
    try:
        run_feature(args, data, out, results)
        _save(out, results)
    finally:
        if tmp:
            tmp.cleanup()
    rec, notes = feature_records(results)
    rec += claim_records(results) + per_seed_records(results, "feature")
    students = Table(
        name="students", columns=[("student", "{student}"), *_acc_columns(), ("seconds", "{seconds:.0f}")]
    )
    return Output(records=rec, tables=[students, CLAIMS, PER_SEED], notes=[_data_note(args, results), *notes],
                  extra=results)  # fmt: skip

"""Image-text (issue 21), several seeds, every run in this process:

  imagetext-datacomp:  DataComp's fixed-recipe protocol on the generated pool (``vitkit make-pool``:
                       Fashion-MNIST + 20% digit images, templated captions, 40% of them corrupted, 10%
                       duplicates). Each filter's pairs train the same CLIP (micro ViT image tower, 2-block
                       text tower) for exactly the same number of samples seen: the filtered rows are
                       shuffled and cycled to one fixed-length CSV, trained for a fixed number of epochs.
                       Headline: zero-shot Fashion-MNIST test top-1 from class-name prompts.
  imagetext-vitamin:   ViTamin (``vitkit_vitamin_micro_16``) vs the plain ViT of about the same size
                       (``vitkit_micro_p4_16``) as the image tower, same pool, recipe and samples seen.
  imagetext-shards:    training throughput streaming from webdataset shards vs the in-memory CSV path
                       (the same pairs, model and recipe; ratio in one run), and the loaders alone.

    python -m bench imagetext-datacomp            # the recorded run
    python -m bench imagetext-datacomp --quick    # smoke: one seed, tiny pool

Partial results are saved after every seed to bench/out/partial/NAME.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

import csv
import random
import statistics
import time
import warnings
from pathlib import Path

from bench.dense import MEAN_SD, _ms, run_seeds
from bench.harness import OUT_DIR, Output, Table

TASK = "image-text:context_length=16"
FILTERS = ("none", "clip-score", "text", "image-cluster", "clip-score+image-cluster", "clip-score+text")
#: arms: the filters, plus a random subset as large as clip-score's (less data vs better data)
ARMS = (*FILTERS, "random")
QUICK = {"seeds": [0], "pool": 1500, "scorer_pool": 600, "samples": 3000, "epochs": 2, "zero_shot": 500,
         "clusters": 50, "repeats": 1}  # fmt: skip


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pool", type=int, default=12000, help="pairs in the generated pool")
    p.add_argument("--corrupt", type=float, default=0.4, help="fraction of corrupted captions in the pool")
    p.add_argument(
        "--scorer-pool", type=int, default=3000, help="clean pairs the CLIP-score scorer trains on"
    )
    p.add_argument("--samples", type=int, default=32000, help="samples seen by every arm (fixed recipe)")
    p.add_argument("--epochs", type=int, default=4, help="epochs over samples/epochs cycled rows")
    p.add_argument("--top", type=float, default=0.3, help="clip-score: fraction kept")
    p.add_argument("--clusters", type=int, default=400, help="image-cluster: k-means centres")
    p.add_argument("--zero-shot", type=int, default=10000, help="Fashion-MNIST test images scored zero-shot")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="imagetext-shards: interleaved repeats")


def _options(args, *keys) -> dict:
    return {k: getattr(args, k) for k in keys}


def _pool(args) -> Path:
    """The generated pool (made once, reused by every seed): bench/out/imagetext/pool-N-C."""
    from vitkit.data.pool import write_pool

    out = OUT_DIR / "imagetext" / f"pool-{args.pool}-{args.corrupt}"
    if not (out / "pool.csv").is_file():
        write_pool(out, args.pool, corrupt=args.corrupt, duplicates=0.1, off_target=0.2, seed=0, shards=8)
    return out / "pool.csv"


def _scorer_pool(args) -> Path:
    """Clean pairs (no corruption, no digits) of other Fashion-MNIST images (seed 1): the scorer's data,
    standing in for the curated data OpenAI's CLIP, DataComp's scorer, was trained on."""
    from vitkit.data.pool import write_pool

    out = OUT_DIR / "imagetext" / f"scorer-{args.scorer_pool}"
    if not (out / "pool.csv").is_file():
        write_pool(out, args.scorer_pool, corrupt=0.0, duplicates=0.0, off_target=0.0, seed=1)
    return out / "pool.csv"


def _fixed_length(src: Path, dst: Path, rows_out: int, seed: int) -> int:
    """``rows_out`` rows of ``src`` (shuffled, cycled when it has fewer), paths made absolute."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    base = src.parent
    rng = random.Random(seed)
    rng.shuffle(rows)
    out = [rows[i % len(rows)] for i in range(rows_out)]
    with open(dst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for r in out:
            p = Path(r["path"])
            w.writerow([str(p if p.is_absolute() else (base / p).resolve()), r["caption"]])
    return len(rows)


def _train_clip(
    args, data: Path, out: Path, seed: int, model: str = "vitkit_micro_p4_16", rows: int | None = None
):
    from vitkit.stages.train import train_model

    cfg = dict(
        model=model, data=f"imagetext:{data}", task=TASK, epochs=args.epochs, batch_size=64, lr=args.lr,
        warmup_epochs=1, val_fraction=0.02, seed=seed, threads=args.threads, tensorboard=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_model(cfg, out, quiet=True, force=True)


def _zero_shot(model, n: int) -> dict:
    import torch

    from vitkit.data import load_eval_data
    from vitkit.tasks.imagetext import zero_shot_metrics

    data = load_eval_data("fashion-mnist")
    data = data.subset(torch.arange(min(n, len(data))))
    return zero_shot_metrics(model, data)


def _datacomp_seed(args, seed: int, tmp: Path) -> dict:
    from vitkit.stages.filter import filter_pool

    pool, scorer_data = _pool(args), _scorer_pool(args)
    rows_per_epoch = args.samples // args.epochs
    scorer_fixed = tmp / f"scorer-{seed}.csv"
    _fixed_length(scorer_data, scorer_fixed, rows_per_epoch, seed)  # the scorer sees as many samples
    scorer = _train_clip(args, scorer_fixed, tmp / f"scorer-{seed}", seed)
    row: dict = {"scorer_zero_shot_top1": _zero_shot(scorer.model, args.zero_shot)["zero_shot_top1"]}
    for by in ARMS:
        csv_out = tmp / f"{by}-{seed}.csv"
        if by == "random":
            rep = _random_subset(pool, csv_out, row["clip-score"]["kept"], seed)
        else:
            rep = filter_pool(
                pool, csv_out, by, top=args.top, scorer=scorer.path, target="fashion-mnist",
                clusters=args.clusters, target_size=5000, seed=seed,
            )  # fmt: skip
        fixed = tmp / f"{by}-{seed}-fixed.csv"
        kept = _fixed_length(csv_out, fixed, rows_per_epoch, seed)
        t0 = time.perf_counter()
        run = _train_clip(args, fixed, tmp / f"clip-{by}-{seed}", seed)
        seconds = time.perf_counter() - t0
        z = _zero_shot(run.model, args.zero_shot)
        unique = {k: v for k, v in rep["noise_after"].items() if k != "duplicate"}
        row[by] = {
            "kept": kept,
            "kept_fraction": rep["kept_fraction"],
            "clean_share": unique.get("clean", 0) / max(1, sum(unique.values())),
            "samples_seen": run.metrics["data_description"]["train_size"] // 64 * 64 * args.epochs,
            "zero_shot_top1": z["zero_shot_top1"],
            "zero_shot_balanced_accuracy": z["zero_shot_balanced_accuracy"],
            "train_seconds": round(seconds, 1),
        }
    return row


def _random_subset(pool: Path, out: Path, n: int, seed: int) -> dict:
    """``n`` rows of the pool drawn at random (paths made absolute), with a filter-like report."""
    from collections import Counter

    with open(pool, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = random.Random(1000 + seed).sample(rows, n)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in keep:
            w.writerow({**r, "path": str((pool.parent / r["path"]).resolve())})
    return {"kept_fraction": n / len(rows), "noise_after": dict(Counter(r["noise"] for r in keep))}


def datacomp(args) -> Output:
    name = "imagetext-datacomp"
    opts = _options(
        args,
        "pool",
        "corrupt",
        "scorer_pool",
        "samples",
        "epochs",
        "top",
        "clusters",
        "zero_shot",
        "lr",
        "threads",
    )
    res = run_seeds(name, opts, args.seeds, lambda seed, tmp: _datacomp_seed(args, seed, tmp))
    seeds = list(res["seeds"].values())
    rec: list[dict] = []
    for by in ARMS:
        s = [x[by] for x in seeds]
        rec.append({"table": "filters", "filter": by, "kept": statistics.mean(r["kept"] for r in s),
                    "clean": statistics.mean(r["clean_share"] for r in s),
                    **_ms([r["zero_shot_top1"] for r in s])})  # fmt: skip
    for by in ARMS[1:]:
        diff = [x[by]["zero_shot_top1"] - x["none"]["zero_shot_top1"] for x in seeds]
        rec.append({"table": "gain", "filter": by, **_ms(diff)})
    rec.append({"table": "gain", "filter": "(the scorer itself, trained on clean pairs)",
                **_ms([x["scorer_zero_shot_top1"] for x in seeds])})  # fmt: skip
    o = res["options"]
    notes = [
        f"Pool: {o['pool']} generated pairs (vitkit make-pool: Fashion-MNIST training images + 20% digit images, "
        f"{o['corrupt']:.0%} of captions corrupted (half another class's, half garbled), 10% exact duplicates). "
        f"Every filter's pairs train the same CLIP (vitkit_micro_p4_16 image tower, open_clip text tower 2 blocks x 64, "
        f"embedding 64, {TASK}) for exactly {o['samples']} samples seen: the kept rows shuffled and cycled to "
        f"{o['samples'] // o['epochs']} rows, {o['epochs']} epochs, AdamW lr {o['lr']}, batch 64, {o['threads']} "
        f"thread(s). Zero-shot: the first {o['zero_shot']} Fashion-MNIST test images, 5 prompt templates averaged.",
        f"Scorer (clip-score, image-cluster): the same CLIP trained (same samples seen) on {o['scorer_pool']} clean pairs of other "
        "Fashion-MNIST images (seed 1 pool), standing in for DataComp's OpenAI CLIP L/14, which was trained on other, "
        f"curated data; one per seed. clip-score keeps the top {o['top']:.0%}; image-cluster: {o['clusters']} k-means "
        "centres over the pool's image embeddings, picked by the nearest centre of 5,000 Fashion-MNIST training images; "
        "text: captions naming a Fashion-MNIST class; random: as many pool rows as clip-score keeps, drawn at "
        "random (is it less data or better data?).",
        f"kept rows: the filtered CSV's rows (duplicates included); clean share of right captions among the kept unique pairs. Seeds "
        f"{list(res['seeds'])} (mean ± sd; the seed drives the scorer, the filters' k-means and the CLIPs); wall "
        f"{res.get('wall_seconds', '?')} s.",
    ]
    tables = [
        Table(
            name="filters",
            columns=[
                ("filter", "{filter}"),
                ("kept rows", "{kept:.0f}"),
                ("clean share", "{clean:.2f}"),
                ("zero-shot FMNIST top-1", MEAN_SD),
            ],
        ),
        Table(name="gain", columns=[("filter - none (per seed)", "{filter}"), ("zero-shot top-1", MEAN_SD)]),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)


# -- ViTamin vs a plain ViT in image-text -----------------------------------------------------------
VITAMIN_ARMS = {"vit": "vitkit_micro_p4_16", "vitamin": "vitkit_vitamin_micro_16"}


def _vitamin_seed(args, seed: int, tmp: Path) -> dict:
    pool = _scorer_pool(args)  # clean pairs: the comparison is of the towers, not of the data
    fixed = tmp / f"fixed-{seed}.csv"
    _fixed_length(pool, fixed, args.samples // args.epochs, seed)
    row = {}
    for arm, model in VITAMIN_ARMS.items():
        t0 = time.perf_counter()
        run = _train_clip(args, fixed, tmp / f"{arm}-{seed}", seed, model=model)
        seconds = time.perf_counter() - t0
        z = _zero_shot(run.model, args.zero_shot)
        row[arm] = {
            "zero_shot_top1": z["zero_shot_top1"],
            "tower_parameters": sum(p.numel() for p in run.model.visual.parameters()),
            "train_seconds": round(seconds, 1),
        }
    return row


def vitamin(args) -> Output:
    name = "imagetext-vitamin"
    opts = _options(args, "scorer_pool", "samples", "epochs", "zero_shot", "lr", "threads")
    res = run_seeds(name, opts, args.seeds, lambda seed, tmp: _vitamin_seed(args, seed, tmp))
    seeds = list(res["seeds"].values())
    rec = []
    for arm, model in VITAMIN_ARMS.items():
        rec.append({"table": "tower", "arm": f"{arm} ({model})", "params": seeds[0][arm]["tower_parameters"],
                    "seconds": statistics.mean(s[arm]["train_seconds"] for s in seeds),
                    **_ms([s[arm]["zero_shot_top1"] for s in seeds])})  # fmt: skip
    diff = [s["vitamin"]["zero_shot_top1"] - s["vit"]["zero_shot_top1"] for s in seeds]
    rec.append({"table": "tower", "arm": "vitamin - vit (per seed)", "params": 0, "seconds": 0, **_ms(diff)})
    o = res["options"]
    notes = [
        f"Both image towers trained in the image-text task ({TASK}) on {o['scorer_pool']} clean generated "
        f"Fashion-MNIST pairs cycled to {o['samples']} samples seen ({o['epochs']} epochs), AdamW lr {o['lr']}, "
        f"batch 64, {o['threads']} thread(s); zero-shot on the first {o['zero_shot']} Fashion-MNIST test images. "
        f"Seeds {list(res['seeds'])} (mean ± sd); wall {res.get('wall_seconds', '?')} s; seconds are as noisy as the "
        "machine's load.",
    ]
    tables = [
        Table(
            name="tower",
            columns=[
                ("image tower", "{arm}"),
                ("tower params", "{params:,}"),
                ("train s", "{seconds:.0f}"),
                ("zero-shot FMNIST top-1", MEAN_SD),
            ],
        ),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)


# -- streaming throughput ------------------------------------------------------------------------------
def shards(args) -> Output:
    """Training img/s from shards vs from the CSV in memory (same pairs: the pool's 8 shards, the last
    one validation on both paths), interleaved repeats; and the loaders alone (batches of 64)."""
    import torch

    from vitkit.data.imagetext import load_shards
    from vitkit.stages.train import train_model

    pool = _pool(args)
    shard_uri = f"shards:{pool.parent}/shards/pool-{{00000..00007}}.tar"
    # the in-memory arm trains on exactly the 7 training shards' pairs
    with open(pool, newline="") as f:
        rows = list(csv.DictReader(f))
    per = -(-len(rows) // 8)
    train_csv = OUT_DIR / "imagetext" / "shards-train.csv"
    with open(train_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for r in rows[: 7 * per]:
            w.writerow([str((pool.parent / r["path"]).resolve()), r["caption"]])
    arms = {"in-memory CSV": f"imagetext:{train_csv}", "streamed shards": shard_uri}
    ips: dict[str, list[float]] = {a: [] for a in arms}
    t_start = time.perf_counter()
    tmp = OUT_DIR / "imagetext" / "shards-runs"
    for rep in range(args.repeats):
        for arm, uri in arms.items():
            cfg = dict(model="vitkit_micro_p4_16", data=uri, task=TASK, epochs=1, batch_size=64, lr=args.lr,
                       warmup_epochs=0, val_fraction=1 / 8, val_size=200, seed=rep, threads=args.threads, tensorboard=False)  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = train_model(cfg, tmp / f"{arm.split()[-1]}-{rep}", quiet=True, force=True)
            ips[arm].append(statistics.mean(h["img_per_s"] for h in run.history))
    # the loaders alone: batches of 64 uint8 images (+ captions) per second
    torch.set_num_threads(args.threads)
    train_stream, _ = load_shards(shard_uri.removeprefix("shards:"), 16)
    from vitkit.data.imagetext import load_imagetext_csv

    mem = load_imagetext_csv(str(train_csv), 16)
    loader: dict[str, list[float]] = {"in-memory CSV": [], "streamed shards": []}
    n_batches = min(100, len(mem) // 64)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        it = train_stream.stream_batches(0, 64, 0)
        for _ in range(n_batches):
            next(it)
        loader["streamed shards"].append(n_batches * 64 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        perm = torch.randperm(len(mem))
        for b in range(n_batches):
            idx = perm[b * 64 : (b + 1) * 64]
            _ = mem.images[idx], [mem.info["captions"][int(i)] for i in mem.targets[idx]]
        loader["in-memory CSV"].append(n_batches * 64 / (time.perf_counter() - t0))
    rec = []
    for arm in arms:
        rec.append({"table": "train", "arm": arm, **_spread(ips[arm])})
        rec.append({"table": "loader", "arm": arm, **_spread(loader[arm])})
    ratio = [s / m for s, m in zip(ips["streamed shards"], ips["in-memory CSV"])]
    rec.append({"table": "train", "arm": "streamed / in-memory (per repeat)", **_spread(ratio)})
    notes = [
        f"The same {7 * per} pairs (the pool's 7 training shards; shard 8 is validation on both paths), "
        f"vitkit_micro_p4_16 + 2-block text tower, 1 epoch, batch 64, {args.threads} thread(s); "
        f"{args.repeats} interleaved repeats (median [min-max]). Training img/s is the loop's own per-epoch figure; "
        f"the loader rows time only producing batches of 64 uint8 images + captions ({n_batches} batches): "
        "reading and decoding PNGs from the tars vs indexing the tensor already in memory (which paid its decoding "
        f"once, at load). Wall {time.perf_counter() - t_start:.0f} s.",
    ]
    tables = [
        Table(
            name="train",
            columns=[("training path", "{arm}"), ("img/s", "{median:.1f} [{min:.1f}-{max:.1f}]")],
        ),
        Table(
            name="loader",
            columns=[("loader alone", "{arm}"), ("images/s", "{median:.0f} [{min:.0f}-{max:.0f}]")],
        ),
    ]
    return Output(records=rec, tables=tables, notes=notes)


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}

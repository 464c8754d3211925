"""Compression benchmarks (issue 6): token reduction, early exit, RePaViT, pruning, linear attention.

Every timing is a ratio against a baseline measured in the same process, interleaved round by round
(``vitkit.deploy.compare``); the min-max spread over rounds is reported. Sections, each a suite ``compress-NAME``:

  deit     deit_small_patch16_224-sized model, random init, 224 px: EViT keep 1.0/0.9/0.7/0.5 at
           blocks 3,6,9 and ToMe r 0/2/4/8 vs the plain model; RePaViT (reparameterized, θ=0.75) and
           structured pruning (heads 0.25, MLP 0.3) timed alongside (throughput batch, latency batch 1)
  demo     the demo model (vitkit_micro_p4_16 trained on digits): EViT / ToMe / pruning off the shelf
           and after a short fine-tune, accuracy and speed
  tokens   EViT keep 1.0/0.9/0.7/0.5 and ToMe r 0..3 on a trained run (--source; e.g. the demo's
           distilled ViT, or a 64-token model), off the shelf and fine-tuned, timed interleaved
           (recorded on --source bench/out/qrun, made by the command in bench/quantization.py)
  exits    LGViT exits on the demo model: accuracy vs mean executed blocks and batch-1 latency
  repavit  RePaViT: FFN latency before/after at ViT-S width, accuracy after short training vs the
           same-size baseline (seeds)
  linear   L²ViT linear attention vs softmax attention (fused SDPA and explicit) at N, 4N, 16N tokens

    python -m bench compress-deit [--threads 1] [--repeats 3] [--batch 16]    # --quick: token reduction only
    python -m bench compress-demo      # likewise compress-exits, compress-repavit, compress-linear
    python -m bench compress-tokens --source runs/demo/vit [--keeps 1.0,0.9,0.7,0.5] [--tome-r 0,1,2,3]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import Output, Table, log, ratio_spread
from vitkit.deploy import BenchConfig, compare

QUICK = {"repeats": 1, "batch": 2, "finetune": 0, "seeds": 1, "epochs": 2}


def add_arguments(p) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a loaded machine)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="throughput batch at 224 px (deit) and FFN timing")
    p.add_argument(
        "--finetune", type=int, default=3, help="fine-tuning epochs after token reduction / pruning"
    )
    p.add_argument("--seeds", type=int, default=1, help="RePaViT accuracy seeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20, help="training epochs of the demo-model runs")
    p.add_argument("--source", help="tokens: the trained run to reduce (e.g. runs/demo/vit)")
    p.add_argument("--keeps", default="1.0,0.9,0.7,0.5", help="tokens: EViT keep rates")
    p.add_argument(
        "--evit-at", default="", help="tokens: EViT block indices, e.g. 2 [default: EViT's quarters]"
    )
    p.add_argument("--tome-r", default="0,1,2,3", help="tokens: ToMe r values (tokens merged per block)")
    p.add_argument(
        "--ft-lr", type=float, default=None, help="tokens: fine-tuning lr [default: the run's lr / 4]"
    )


def _row(name: str, r, base, top1: float | None = None) -> dict:
    return {
        "name": name,
        "top1": top1,
        "parameters": r.parameters,
        "gflops": r.flops / 1e9,
        "latency_ms": r.latency_ms_p50,
        "latency_ratio": base.latency_ms_p50 / r.latency_ms_p50,  # > 1: faster
        "throughput": r.throughput,
        "throughput_ratio": r.throughput / base.throughput,
        "throughput_ratio_spread": list(ratio_spread(r.throughput_rounds, base.throughput_rounds)),
    }


# -- deit_small-sized timing ----------------------------------------------------------------------
def section_deit(args) -> list[dict]:
    from vitkit.compress.prune import StructuredPruneConfig, apply_structured_prune
    from vitkit.compress.reparam import RePaViTConfig, apply_repavit, reparameterize
    from vitkit.compress.tokens import EViTConfig, ToMeConfig, apply_evit, apply_tome
    from vitkit.models import create_model

    def base():
        torch.manual_seed(0)
        return create_model("deit_small_patch16_224", num_classes=1000).eval()

    models = {"deit_small": base()}
    for keep in (0.9, 0.7, 0.5):
        models[f"evit keep {keep}"] = apply_evit(base(), EViTConfig(keep=keep, at=[3, 6, 9]))
    for r in (2, 4, 8):
        models[f"tome r {r}"] = apply_tome(base(), ToMeConfig(r=r))
    if not args.quick:
        m = apply_repavit(base(), RePaViTConfig(idle=0.75)).eval()
        models["repavit θ0.75 (reparam)"] = reparameterize(m)
        models["pruned heads .25 mlp .3"] = apply_structured_prune(base(), StructuredPruneConfig(0.25, 0.3))
    cfg = BenchConfig(
        threads=args.threads, repeats=args.repeats, warmup=1, latency_calls=3, throughput_batch=args.batch
    )
    res = compare(models, (3, 224, 224), cfg)
    b = res["deit_small"]
    return [_row(k, v, b) for k, v in res.items()]


# -- the demo model -------------------------------------------------------------------------------
def _demo_config(**kw):
    from vitkit.train import TrainConfig

    base = dict(model="vitkit_micro_p4_16", data="digits", epochs=20, batch_size=64, lr=2e-3, warmup_epochs=1,
                scale_min=0.8, translate=0.1, tensorboard=False)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def section_demo(args, work: Path) -> dict:
    from vitkit.api import train_model
    from vitkit.runs import load
    from vitkit.stages.compress import prune_run, reduce_tokens_run

    src = work / "demo"
    train_model(_demo_config(seed=args.seed, epochs=args.epochs), src, quiet=True)
    runs = {"baseline": src}
    variants = [("evit keep 0.9", dict(method="evit", keep=0.9)), ("evit keep 0.7", dict(method="evit", keep=0.7)),
                ("evit keep 0.5", dict(method="evit", keep=0.5)), ("tome r 1", dict(method="tome", r=1)),
                ("tome r 2", dict(method="tome", r=2)), ("tome r 3", dict(method="tome", r=3))]  # fmt: skip
    prunes = [("structured h.25 m.3", dict(method="structured", heads=0.25, mlp=0.3)),
              ("lpvit flops .5", dict(method="lpvit", flops=0.5)), ("dimap 50%", dict(method="dimap", sparsity=0.5))]  # fmt: skip
    acc: dict[str, dict] = {}
    for name, kw in variants + prunes:
        fn = prune_run if name in dict(prunes) else reduce_tokens_run
        slug = name.replace(" ", "_").replace(".", "")
        res = fn(src, work / slug, finetune=args.finetune, **kw)
        acc[name] = {"off_the_shelf_top1": res.metrics["off_the_shelf_top1"], "finetuned_top1": res.metrics["top1"],
                     "source_top1": res.metrics["source_top1"]}  # fmt: skip
        runs[name] = work / slug
    models = {k: load(v) for k, v in runs.items()}
    cfg = BenchConfig(threads=args.threads, repeats=args.repeats, throughput_batch=64, latency_calls=20)
    res = compare(models, (3, 16, 16), cfg)
    b = res["baseline"]
    rows = []
    for k, v in res.items():
        row = _row(k, v, b)
        row.update(acc.get(k, {"off_the_shelf_top1": None, "finetuned_top1": None}))
        rows.append(row)
    from vitkit.runs import read_metrics

    return {"source_top1": read_metrics(src)["top1"], "finetune_epochs": args.finetune, "rows": rows}


# -- token reduction on a trained run (issue 6's goal: >= 1.4x throughput at <= 0.5 pt) ------------
def section_tokens(args, work: Path) -> dict:
    """EViT (keep rates ``--keeps`` at ``--evit-at``) and ToMe (``--tome-r`` per block) on the trained
    run ``--source``: top-1 off the shelf and after ``--finetune`` epochs (EViT with its keep-rate
    warm-up over the first half), every variant timed against the source model in one process,
    interleaved, batch 64. Keep 1.0 / r 0 fine-tuned are the control: what the extra epochs alone do."""
    from vitkit.models import model_input_size
    from vitkit.runs import load, read_metrics
    from vitkit.stages.compress import reduce_tokens_run

    src = Path(args.source)
    at = [int(a) for a in args.evit_at.split(",")] if args.evit_at else None
    variants = [
        (f"evit keep {k:g}", dict(method="evit", keep=k, at=at)) for k in map(float, args.keeps.split(","))
    ]
    variants += [(f"tome r {r}", dict(method="tome", r=r)) for r in map(int, args.tome_r.split(","))]
    runs, acc = {"baseline": src}, {}
    for name, kw in variants:
        slug = name.replace(" ", "_").replace(".", "")
        res = reduce_tokens_run(
            src, work / f"tok_{slug}", finetune=args.finetune, lr=args.ft_lr, force=True, **kw
        )
        m = res.metrics
        acc[name] = {
            "off_the_shelf_top1": m["off_the_shelf_top1"],
            "finetuned_top1": m["top1"] if args.finetune else None,
        }
        runs[name] = work / f"tok_{slug}"
        log(f"{name}: {acc[name]}")
    models = {k: load(v) for k, v in runs.items()}
    shape = model_input_size(models["baseline"])
    cfg = BenchConfig(threads=args.threads, repeats=args.repeats, throughput_batch=64, latency_calls=20)
    res = compare(models, shape, cfg)
    b = res["baseline"]
    rows = []
    for k, v in res.items():
        row = _row(k, v, b)
        row.update(acc.get(k, {"off_the_shelf_top1": None, "finetuned_top1": None}))
        rows.append(row)
    src_metrics = read_metrics(src)
    grid = getattr(models["baseline"].patch_embed, "grid_size", (0, 0))
    return {"source": str(src), "source_top1": src_metrics["top1"], "val_images": src_metrics.get("n"),
            "input_shape": list(shape), "patch_tokens": int(grid[0] * grid[1]), "evit_at": at or "default",
            "finetune_epochs": args.finetune, "finetune_lr": args.ft_lr, "rows": rows}  # fmt: skip


# -- early exit -----------------------------------------------------------------------------------
def section_exits(args, work: Path) -> dict:
    from vitkit.compress.exits import threshold_sweep
    from vitkit.data import load_splits
    from vitkit.stages.compress import train_with_exits

    res = train_with_exits(
        _demo_config(seed=args.seed, epochs=args.epochs), work / "exits", exits=[1, 2, 3], quiet=True
    )
    data = load_splits("digits")
    rows = threshold_sweep(
        res.model, data.val, (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.01), latency_images=64, repeats=3
    )
    return {"exit_top1": res.metrics["exit_top1"], "final_top1": res.metrics["final_top1"], "sweep": rows}


# -- RePaViT --------------------------------------------------------------------------------------
def section_repavit(args, work: Path) -> dict:
    from timm.layers import Mlp

    from vitkit.api import train_model
    from vitkit.compress.reparam import ChannelIdleMlp, ReparamMlp, fold_block  # noqa: F401
    from vitkit.stages.compress import reparam_run

    # FFN alone at ViT-S width (C=384, H=1536, 197 tokens), random weights: Mlp vs the reparameterized FFN
    torch.manual_seed(0)
    C, N = 384, 197
    dense = Mlp(C, 4 * C).eval()
    small = ReparamMlp(C, (4 * C) // 4).eval()
    x = torch.randn(args.batch, N, C)
    t_dense, t_small = [], []
    with torch.no_grad():
        for m in (dense, small):
            m(x)
        for _ in range(max(5, args.repeats)):
            for m, ts in ((dense, t_dense), (small, t_small)):
                t = time.perf_counter()
                m(x)
                ts.append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(t_dense, t_small)]
    ffn = {"batch": args.batch, "tokens": N, "dim": C, "speedup_median": statistics.median(ratios),
           "speedup_spread": [min(ratios), max(ratios)]}  # fmt: skip

    seeds = []
    for seed in range(args.seed, args.seed + args.seeds):
        base = train_model(_demo_config(seed=seed, epochs=args.epochs), work / f"rp_base{seed}", quiet=True)
        rp = train_model(
            _demo_config(seed=seed, epochs=args.epochs).model_copy(
                update={"transforms": ["repavit:idle=0.75"]}
            ),
            work / f"rp{seed}",
            quiet=True,
        )
        folded = reparam_run(rp.path, work / f"rp{seed}_reparam")
        seeds.append({"seed": seed, "baseline_top1": base.metrics["top1"], "repavit_top1": rp.metrics["top1"],
                      "reparam_top1": folded.metrics["top1"], "parameters_baseline": base.metrics["parameters"],
                      "parameters_reparam": folded.metrics["parameters"]})  # fmt: skip
    return {"ffn": ffn, "accuracy": seeds}


# -- linear attention -----------------------------------------------------------------------------
def section_linear(args) -> list[dict]:
    from timm.layers import Attention

    from vitkit.compress.linear_attention import LinearAttention
    from vitkit.models import VitkitAttention

    torch.manual_seed(0)
    C = 384
    soft = VitkitAttention(Attention(C, num_heads=6, qkv_bias=True)).eval()
    explicit = VitkitAttention(Attention(C, num_heads=6, qkv_bias=True)).eval()
    explicit.force_unfused = True
    lin = LinearAttention(
        VitkitAttention(Attention(C, num_heads=6, qkv_bias=True)), (0, 0), 1, lcm_kernel=0
    ).eval()
    rows = []
    with torch.no_grad():
        for n in (197, 4 * 197, 16 * 197):
            x = torch.randn(1, n, C)
            times: dict[str, list[float]] = {"softmax_sdpa": [], "softmax_explicit": [], "linear": []}
            mods = {"softmax_sdpa": soft, "softmax_explicit": explicit, "linear": lin}
            for m in mods.values():
                m(x)
            for _ in range(max(3, args.repeats)):
                for k, m in mods.items():
                    t = time.perf_counter()
                    m(x)
                    times[k].append((time.perf_counter() - t) * 1e3)
            row = {"tokens": n, **{f"{k}_ms": statistics.median(v) for k, v in times.items()}}
            row["linear_speedup_vs_sdpa"] = row["softmax_sdpa_ms"] / row["linear_ms"]
            rows.append(row)
    for row in rows:
        row["linear_growth"] = row["linear_ms"] / rows[0]["linear_ms"]
        row["sdpa_growth"] = row["softmax_sdpa_ms"] / rows[0]["softmax_sdpa_ms"]
    return rows


# -- suites: records and tables ------------------------------------------------------------------
def _flat(rows: list[dict], table: str) -> list[dict]:
    out = []
    for r in rows:
        d = {k: v for k, v in r.items() if k != "throughput_ratio_spread"}
        if "throughput_ratio_spread" in r:
            d["ratio_min"], d["ratio_max"] = r["throughput_ratio_spread"]
        out.append({"table": table, **d, "mflops": r["gflops"] * 1e3, "params_m": r["parameters"] / 1e6})
    return out


RATIO = ("throughput ratio (spread)", "{throughput_ratio:.2f}x ({ratio_min:.2f}-{ratio_max:.2f})")


def _setup(args) -> None:
    torch.set_num_threads(args.threads)


def deit(args) -> Output:
    _setup(args)
    rows = section_deit(args)
    notes = [f"deit_small-sized (random init, 224 px), {args.threads} thread(s), throughput batch {args.batch}, "
             f"{args.repeats} interleaved rounds; ratios vs the plain model (> 1: faster)."]  # fmt: skip
    table = Table(name="deit", columns=[("model", "{name}"), ("GFLOPs", "{gflops:.2f}"), ("params", "{params_m:.1f}M"),
                                        RATIO, ("batch-1 latency ratio", "{latency_ratio:.2f}x")])  # fmt: skip
    return Output(records=_flat(rows, "deit"), tables=[table], notes=notes)


def demo(args) -> Output:
    _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        res = section_demo(args, Path(tmp))
    notes = [f"demo model (vitkit_micro_p4_16, digits, source top-1 {res['source_top1']:.1%}), fine-tune "
             f"{res['finetune_epochs']} epochs; {args.threads} thread(s), batch 64, {args.repeats} rounds."]  # fmt: skip
    table = Table(name="demo", columns=[("variant", "{name}"), ("top-1 off the shelf", "{off_the_shelf_top1:.1%}"),
                                        ("top-1 fine-tuned", "{finetuned_top1:.1%}"), ("MFLOPs", "{mflops:.2f}"),
                                        ("params", "{parameters:,}"), RATIO, ("latency ratio", "{latency_ratio:.2f}x")])  # fmt: skip
    return Output(records=_flat(res.pop("rows"), "demo"), tables=[table], notes=notes, extra=res)


def tokens(args) -> Output:
    if not args.source:
        raise SystemExit("error: compress-tokens needs --source RUN_DIR (a trained run)")
    _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        res = section_tokens(args, Path(tmp))
    notes = [f"`{res['source']}` ({res['patch_tokens']} patch tokens, input {res['input_shape']}, source top-1 "
             f"{res['source_top1']:.1%} on {res['val_images']} images), EViT at {res['evit_at']}, fine-tune "
             f"{res['finetune_epochs']} epochs (lr {res.get('finetune_lr') or 'run lr / 4'}); {args.threads} thread(s), "
             f"batch 64, {args.repeats} rounds. Keep 1.0 / r 0 fine-tuned are the control (the extra epochs alone)."]  # fmt: skip
    table = Table(name="tokens", columns=[("variant", "{name}"), ("top-1 off the shelf", "{off_the_shelf_top1:.1%}"),
                                          ("top-1 fine-tuned", "{finetuned_top1:.1%}"), ("MFLOPs", "{mflops:.2f}"),
                                          RATIO, ("latency ratio", "{latency_ratio:.2f}x")])  # fmt: skip
    return Output(records=_flat(res.pop("rows"), "tokens"), tables=[table], notes=notes, extra=res)


def exits(args) -> Output:
    _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        res = section_exits(args, Path(tmp))
    records = []
    for r in res["sweep"]:
        lo, hi = r["latency_ratio_spread"]
        records.append({"table": "exits", **{k: v for k, v in r.items() if k != "latency_ratio_spread"},
                        "latency_ratio_min": lo, "latency_ratio_max": hi})  # fmt: skip
    notes = [f"LGViT exits after blocks 1,2,3 of 4 (demo model); exit top-1 {res['exit_top1']}, final "
             f"{res['final_top1']:.1%}; {args.threads} thread(s)."]  # fmt: skip
    table = Table(name="exits", columns=[("threshold", "{threshold:g}"), ("top-1", "{top1:.1%}"),
                                         ("mean blocks", "{mean_blocks:.2f} / {depth}"),
                                         ("batch-1 latency ratio vs backbone (spread)",
                                          "{latency_ratio:.2f} ({latency_ratio_min:.2f}-{latency_ratio_max:.2f})")])  # fmt: skip
    return Output(records=records, tables=[table], notes=notes, extra={"exit_top1": res["exit_top1"]})


def repavit(args) -> Output:
    _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        res = section_repavit(args, Path(tmp))
    f = res["ffn"]
    notes = [f"RePaViT θ=0.75: FFN alone (C={f['dim']}, {f['tokens']} tokens, batch {f['batch']}, random weights) "
             f"{f['speedup_median']:.2f}x faster ({f['speedup_spread'][0]:.2f}-{f['speedup_spread'][1]:.2f}) than the "
             f"dense Mlp, timed interleaved; {args.threads} thread(s)."]  # fmt: skip
    records = [{"table": "repavit", **r} for r in res["accuracy"]]
    table = Table(name="repavit", columns=[("seed", "{seed}"), ("baseline top-1", "{baseline_top1:.1%}"),
                                           ("RePaViT top-1", "{repavit_top1:.1%}"), ("after reparam", "{reparam_top1:.1%}"),
                                           ("params baseline → reparam", "{parameters_baseline:,} → {parameters_reparam:,}")])  # fmt: skip
    return Output(records=records, tables=[table], notes=notes, extra={"ffn": f})


def linear(args) -> Output:
    _setup(args)
    rows = section_linear(args)
    notes = [f"Attention alone (C=384, 6 heads, batch 1, {args.threads} thread(s)), median of "
             f"{max(3, args.repeats)} interleaved calls; growth relative to 197 tokens."]  # fmt: skip
    table = Table(name="linear", columns=[("tokens", "{tokens}"), ("softmax SDPA ms", "{softmax_sdpa_ms:.1f}"),
                                          ("softmax explicit ms", "{softmax_explicit_ms:.1f}"), ("linear ms", "{linear_ms:.1f}"),
                                          ("linear growth", "{linear_growth:.1f}x"), ("SDPA growth", "{sdpa_growth:.1f}x"),
                                          ("linear vs SDPA", "{linear_speedup_vs_sdpa:.2f}x")])  # fmt: skip
    return Output(records=[{"table": "linear", **r} for r in rows], tables=[table], notes=notes)

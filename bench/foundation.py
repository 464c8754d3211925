"""Foundation benchmarks (issue: foundation), each against a baseline measured in the same process.

(a) training-loop throughput: vitkit's `fit` vs a bare PyTorch loop (same timm model, same data in
    memory, same optimizer and batch size, no augmentation, no per-epoch validation), img/s;
(b) inference throughput: a model loaded by `vitkit.load` (with VitkitAttention) vs plain
    `timm.create_model` with the same weights, batch 64 and batch-1 latency;
(c) precision: bf16 autocast vs fp32, training (vitkit loop) and inference (deit_small, batch 16).

Runs are interleaved (A, B, B, A, ...) so machine drift hits both; the median ratio and the min–max
spread over repeats are reported.

    python -m bench foundation --repeats 5 [--parts a,b,c]
"""

from __future__ import annotations

import statistics
import tempfile
import time

import timm
import torch

from bench.harness import Output, Table, log
from vitkit.data import BatchTransform, load_splits
from vitkit.deploy import BenchConfig, compare
from vitkit.models import create_model
from vitkit.train import TrainConfig, fit

QUICK = {"repeats": 1, "epochs": 1, "parts": "a"}
THREADS = 2


def add_arguments(p) -> None:
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3, help="training epochs per round in (a)")
    p.add_argument("--parts", default="a,b,c", help="which of (a) training, (b) inference, (c) precision")


def bare_loop(model, data, cfg: TrainConfig, epochs: int) -> float:
    """The loop a user would write by hand: shuffle, normalize, forward, CE, AdamW step. img/s."""
    tf = BatchTransform(16, 3, (0.5,) * 3, (0.5,) * 3, train=False)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.resolved_lr(), weight_decay=cfg.resolved_weight_decay()
    )
    crit = torch.nn.CrossEntropyLoss()
    n = len(data.train)
    steps = n // cfg.batch_size
    model.train()
    seen, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for s in range(steps):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            x = tf.images(data.train.images[idx])
            loss = crit(model(x), data.train.targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
    return seen / (time.perf_counter() - t0)


def vitkit_loop(model, data, cfg: TrainConfig) -> float:
    res = fit(model, data, cfg, quiet=True)
    return sum(r["img_per_s"] * r["epoch_seconds"] for r in res.history) / res.train_seconds


def bench_training(repeats: int, epochs: int) -> dict:
    data = load_splits("digits")
    # Validation only at the end, so both loops time the same work (training steps) per epoch.
    cfg = TrainConfig(model="vitkit_micro_p4_16", epochs=epochs, batch_size=64, lr=1e-3, tensorboard=False,
                      eval_every=10_000, precision="fp32")  # fmt: skip
    ratios, vk, bare = [], [], []
    for r in range(repeats):
        order = ("vitkit", "bare") if r % 2 == 0 else ("bare", "vitkit")
        got = {}
        for which in order:
            torch.manual_seed(0)
            if which == "vitkit":
                got[which] = vitkit_loop(create_model("vitkit_micro_p4_16", num_classes=10), data, cfg)
            else:
                got[which] = bare_loop(
                    timm.create_model("vitkit_micro_p4_16", num_classes=10), data, cfg, epochs
                )
        vk.append(got["vitkit"])
        bare.append(got["bare"])
        ratios.append(got["vitkit"] / got["bare"])
        log(
            f"train round {r}: vitkit {got['vitkit']:.0f} img/s, bare {got['bare']:.0f} img/s, ratio {ratios[-1]:.3f}"
        )
    return {
        "model": "vitkit_micro_p4_16", "data": "digits (1,438 train images, 16 px)", "epochs_per_round": epochs,
        "vitkit_img_s": vk, "bare_img_s": bare, "ratios": ratios,
        "ratio_median": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)],
    }  # fmt: skip


def bench_inference(repeats: int, name: str, img: int) -> dict:
    from vitkit.runs import load, save_model

    with tempfile.TemporaryDirectory() as tmp:
        model = create_model(name, num_classes=10, img_size=img)
        save_model(tmp, model, classes=[str(i) for i in range(10)])
        loaded = load(tmp)
        plain = timm.create_model(name, num_classes=10, img_size=img).eval()
        plain.load_state_dict(loaded.state_dict())
        res = compare({"vitkit": loaded, "timm": plain}, (3, img, img),
                      BenchConfig(threads=THREADS, repeats=repeats, throughput_batch=64 if img <= 32 else 16))  # fmt: skip
    ratios = [a / b for a, b in zip(res["vitkit"].throughput_rounds, res["timm"].throughput_rounds)]
    return {
        "model": name, "img_size": img,
        "vitkit": res["vitkit"].to_dict(), "timm": res["timm"].to_dict(),
        "throughput_ratio_median": statistics.median(ratios), "throughput_ratio_spread": [min(ratios), max(ratios)],
        "latency_ratio_p50": res["vitkit"].latency_ms_p50 / res["timm"].latency_ms_p50,
    }  # fmt: skip


def bench_precision(repeats: int, epochs: int) -> dict:
    """(c) bf16 autocast vs fp32 in the vitkit loop (training img/s) and inference (deit_small, batch 16)."""
    data = load_splits("digits")
    out = {"train": {}, "infer": {}}
    for prec in ("fp32", "bf16"):
        cfg = TrainConfig(model="vitkit_micro_p4_16", epochs=epochs, batch_size=64, lr=1e-3, tensorboard=False,
                          eval_every=10_000, precision=prec)  # fmt: skip
        speeds = []
        for _ in range(max(1, repeats // 2)):
            torch.manual_seed(0)
            speeds.append(vitkit_loop(create_model("vitkit_micro_p4_16", num_classes=10), data, cfg))
        out["train"][prec] = statistics.median(speeds)
    m = create_model("deit_small_patch16_224", num_classes=10).eval()
    for prec in ("fp32", "bf16"):
        res = compare({"m": m}, (3, 224, 224), BenchConfig(threads=THREADS, repeats=max(2, repeats // 2), throughput_batch=16,
                                                            latency_calls=3, precision=prec))  # fmt: skip
        out["infer"][prec] = res["m"].throughput
    out["train_bf16_over_fp32"] = out["train"]["bf16"] / out["train"]["fp32"]
    out["infer_bf16_over_fp32"] = out["infer"]["bf16"] / out["infer"]["fp32"]
    return out


def run(args) -> Output:
    torch.set_num_threads(THREADS)
    parts = set(args.parts.split(","))
    records, tables, extra = [], [], {"threads": THREADS}
    if "a" in parts:
        log("(a) training loop: vitkit fit vs bare PyTorch loop")
        train = extra["training"] = bench_training(args.repeats, args.epochs)
        records.append({"table": "train", "model": train["model"], "data": train["data"],
                        "vitkit": statistics.median(train["vitkit_img_s"]), "bare": statistics.median(train["bare_img_s"]),
                        "ratio": train["ratio_median"], "ratio_min": train["ratio_spread"][0],
                        "ratio_max": train["ratio_spread"][1]})  # fmt: skip
        tables.append(Table(name="train", title=f"(a) training loop, {args.epochs} epochs per round, img/s (median)",
                            columns=[("model", "{model}"), ("data", "{data}"), ("vitkit fit", "{vitkit:.0f}"),
                                     ("bare loop", "{bare:.0f}"),
                                     ("ratio (spread)", "{ratio:.3f} ({ratio_min:.3f}-{ratio_max:.3f})")]))  # fmt: skip
    if "b" in parts:
        log("(b) inference: vitkit.load vs timm.create_model")
        infer = extra["inference"] = [
            bench_inference(args.repeats, "vitkit_micro_p4_16", 16),
            bench_inference(args.repeats, "deit_small_patch16_224", 224),
        ]
        for i in infer:
            records.append({"table": "infer", "model": i["model"], "img_size": i["img_size"],
                            "vitkit": i["vitkit"]["throughput"], "timm": i["timm"]["throughput"],
                            "ratio": i["throughput_ratio_median"], "ratio_min": i["throughput_ratio_spread"][0],
                            "ratio_max": i["throughput_ratio_spread"][1], "latency_ratio": i["latency_ratio_p50"]})  # fmt: skip
        tables.append(Table(name="infer", title="(b) inference: vitkit.load vs timm.create_model, same weights",
                            columns=[("model", "{model}"), ("px", "{img_size}"), ("vitkit img/s", "{vitkit:.1f}"),
                                     ("timm img/s", "{timm:.1f}"),
                                     ("throughput ratio (spread)", "{ratio:.3f} ({ratio_min:.3f}-{ratio_max:.3f})"),
                                     ("batch-1 latency ratio", "{latency_ratio:.3f}")]))  # fmt: skip
    if "c" in parts:
        log("(c) precision: bf16 autocast vs fp32")
        prec = extra["precision"] = bench_precision(args.repeats, 1)
        for what, title in (
            ("train", "training (vitkit loop, img/s)"),
            ("infer", "inference (deit_small, batch 16)"),
        ):
            records.append({"table": "precision", "what": title, "fp32": prec[what]["fp32"], "bf16": prec[what]["bf16"],
                            "ratio": prec[f"{what}_bf16_over_fp32"]})  # fmt: skip
        tables.append(Table(name="precision", title="(c) bf16 autocast vs fp32 (medians)",
                            columns=[("", "{what}"), ("fp32", "{fp32:.1f}"), ("bf16", "{bf16:.1f}"),
                                     ("bf16 / fp32", "{ratio:.2f}")]))  # fmt: skip
    notes = [f"{THREADS} threads; runs interleaved (A, B, B, A, ...) so machine drift hits both; ratios: median "
             f"and min-max over {args.repeats} rounds."]  # fmt: skip
    return Output(records=records, tables=tables, notes=notes, extra=extra)

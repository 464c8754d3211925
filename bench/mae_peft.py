"""MAE pretraining, fine-tuning with few labels, PEFT methods and ExPLoRA on real digits, 3 seeds.

Every comparison is measured in this one process against its baseline:
  1. MAE: held-out masked-patch loss vs the predict-the-mean baselines.
  2. Fine-tuning from the MAE encoder on 10% of the labels vs training from scratch on the same 10%,
     same epochs.
  3. Linear / kNN probe on MAE features vs a random-init encoder.
  4. PEFT from the MAE encoder on all labels: LoRA (peft, qkv), LoRA-QV (ours), VPT shallow / deep,
     DVPT, linear probe (head only) and full fine-tuning: accuracy, trainable parameters, optimizer
     state bytes, training img/s (timed interleaved, median and spread of rounds).
  5. ExPLoRA on a shifted domain (colour-inverted digits): linear probe before vs after stage 1.

    python -m bench mae-peft              # the recorded run (about 25 min on 2 loaded cores)
    python -m bench mae-peft --quick      # smoke: one seed, 2 epochs per stage

The result so far is saved after every seed to bench/out/partial/mae-peft.json (a cut-short run keeps it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads on a shared machine: 40x slower
os.environ.setdefault("VITKIT_PROGRESS", "0")

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import OUT_DIR, Output, Table, log
from vitkit.adapt import measure_probe, parameter_count
from vitkit.adapt.peft import apply_peft, load_pretrained_weights, subsample_labels
from vitkit.api import train_model
from vitkit.data import BatchTransform, DataSplits, load_splits
from vitkit.models import create_model, model_input_size, model_normalization
from vitkit.runs import load
from vitkit.stages.finetune import finetune
from vitkit.stages.pretrain import explora_pretrain, pretrain_mae
from vitkit.train import TrainConfig, build_optimizer

PARTIAL = OUT_DIR / "partial" / "mae-peft.json"
QUICK = {"seeds": [0], "mae_epochs": 2, "ft_epochs": 2, "peft_epochs": 2, "explora_epochs": 2}


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mae-epochs", type=int, default=60)
    p.add_argument("--ft-epochs", type=int, default=40)
    p.add_argument("--peft-epochs", type=int, default=15)
    p.add_argument("--explora-epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--skip-cost", action="store_true", help="no cost table (parameters, optimizer state, img/s)"
    )


MODEL = "vitkit_micro_p4_16"
PEFT = {
    "linear probe (head)": ("linear", {}, 1e-2),
    "LoRA qkv (peft, r8)": ("lora", {"rank": 8, "alpha": 16}, 5e-3),
    "LoRA-QV (ours, r8)": ("lora-qv", {"rank": 8, "alpha": 16}, 5e-3),
    "VPT shallow (M=8)": ("vpt-shallow", {"num_prompts": 8}, 1e-2),
    "VPT deep (M=8)": ("vpt-deep", {"num_prompts": 8}, 1e-2),
    "DVPT (r=16, M=8)": ("dvpt", {"bottleneck": 16, "num_prompts": 8}, 5e-3),
    "full fine-tuning": (None, {}, 2e-3),
}


def inverted(data: DataSplits) -> DataSplits:
    tr = data.train.subset(range(len(data.train)))
    va = data.val.subset(range(len(data.val)))
    tr.images, va.images = 255 - tr.images, 255 - va.images
    return DataSplits(tr, va, None, {**data.description, "shift": "colour-inverted"})


def loop_cfg(seed: int, **kw) -> TrainConfig:
    base = dict(model=MODEL, data="digits", batch_size=64, seed=seed, tensorboard=False, warmup_epochs=1)
    fields = {**base, **kw}
    fields["warmup_epochs"] = min(fields["warmup_epochs"], fields.get("epochs", 30) - 1)
    return TrainConfig(**fields)


def stats(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def optimizer_state_bytes(model: torch.nn.Module, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> int:
    opt = build_optimizer(model, cfg)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    )


def time_training(
    models: dict[str, torch.nn.Module], cfgs: dict, x, y, rounds: int = 5, steps: int = 5
) -> dict:
    """img/s of forward + backward + AdamW step, methods timed alternately in every round."""
    opts = {k: build_optimizer(m, cfgs[k]) for k, m in models.items()}
    per: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds + 1):
        for k, m in models.items():
            m.train()
            t = time.perf_counter()
            for _ in range(steps):
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
            if r > 0:  # round 0 warms up
                per[k].append(steps * len(x) / (time.perf_counter() - t))
    return per


def measure_cost(digits: DataSplits, mae_dir: Path) -> dict:
    """Trainable parameters, optimizer state and training img/s per method (one process, interleaved)."""
    img = model_input_size(create_model(MODEL))
    mean, std = model_normalization(create_model(MODEL))
    tf = BatchTransform(img[1], img[0], mean, std)
    x = tf.images(digits.train.images[:64])
    y = digits.train.targets[:64]
    src = load(mae_dir)
    models, cfgs, cost = {}, {}, {}
    for name, (method, pcfg, lr) in PEFT.items():
        m = create_model(MODEL, num_classes=10, global_pool="avg", fc_norm=True, drop_path_rate=0.0)
        load_pretrained_weights(m, src)
        if method is not None:
            apply_peft(m, method, pcfg)
        cfg = loop_cfg(0, lr=lr, layer_decay=None if method else 0.75)
        count = parameter_count(m)
        cost[name] = {
            "trainable": count.trainable,
            "total": count.total,
            "opt_state_bytes": optimizer_state_bytes(m, cfg, x, y),
        }
        models[name], cfgs[name] = m, cfg
    speed = time_training(models, cfgs, x, y)
    base = statistics.median(speed["full fine-tuning"])
    for name, xs in speed.items():
        cost[name].update(
            img_per_s=statistics.median(xs),
            img_per_s_spread=(min(xs), max(xs)),
            speed_vs_full=statistics.median(xs) / base,
        )
    return cost


def run(args) -> Output:
    torch.set_num_threads(args.threads)
    t_start = time.time()
    digits = load_splits("digits")
    shifted = inverted(digits)
    res: dict = {"seeds": {}}
    work = Path(tempfile.mkdtemp(prefix="vitkit-bench-"))

    for seed in args.seeds:
        r: dict = {}
        sd = work / f"seed{seed}"
        # 1. MAE pretraining (RandomResizedCrop scale 0.5-1, no flips: digits are not mirror-symmetric)
        mae_cfg = loop_cfg(seed, epochs=args.mae_epochs, lr=1.5e-3, warmup_epochs=5, scale_min=0.5)
        mae = pretrain_mae(mae_cfg, sd / "mae", quiet=True)
        r["mae"] = {
            k: mae.metrics[k] for k in ("val_loss", "val_mean_baseline", "val_position_mean_baseline")
        }
        r["mae"]["train_seconds"] = mae.metrics["train_seconds"]

        # 3. probes: MAE encoder vs random init
        torch.manual_seed(seed)
        rand = create_model(MODEL, num_classes=0, global_pool="avg", fc_norm=True)
        enc = load(sd / "mae")
        r["probe"] = {
            f"{who} {meth}": measure_probe(m, digits, {"method": meth}).top1
            for who, m in (("mae", enc), ("random", rand))
            for meth in ("linear", "knn")
        }

        # 2. 10% labels: from MAE vs from scratch, same epochs and loop settings
        ft = dict(
            epochs=args.ft_epochs,
            lr=2e-3,
            warmup_epochs=min(2, args.ft_epochs - 1),
            batch_size=32,
            seed=seed,
            tensorboard=False,
        )
        from_mae = finetune(sd / "mae", sd / "ft10", ft, labels_fraction=0.1, quiet=True)
        few = subsample_labels(digits, 0.1, seed)
        scratch_fields = {k: v for k, v in ft.items() if k != "seed"}
        scratch_cfg = loop_cfg(
            seed, **scratch_fields, drop_path=0.1, model_kwargs={"global_pool": "avg", "fc_norm": True}
        )
        scratch = train_model(scratch_cfg, sd / "scratch10", data=few, quiet=True)
        r["labels10"] = {"from_mae": from_mae.metrics["top1"], "scratch": scratch.metrics["top1"]}

        # 4. PEFT table on all labels
        r["peft"] = {}
        for name, (method, pcfg, lr) in PEFT.items():
            tr = dict(
                epochs=args.peft_epochs,
                lr=lr,
                warmup_epochs=min(1, args.peft_epochs - 1),
                seed=seed,
                tensorboard=False,
            )
            run = finetune(
                sd / "mae", sd / f"peft-{method or 'full'}", tr, peft=method, peft_config=pcfg, quiet=True
            )
            r["peft"][name] = {
                "top1": run.metrics["top1"],
                "trainable": run.metrics["trainable_parameters"],
                "total": run.metrics["parameters"],
            }

        # 5. ExPLoRA: probe on inverted digits before and after stage 1 (MAE on inverted images)
        before = measure_probe(enc, shifted, {"method": "linear"}).top1
        ex_cfg = loop_cfg(seed, epochs=args.explora_epochs, lr=1.5e-3, warmup_epochs=1, scale_min=0.5)
        ex = explora_pretrain(
            sd / "mae", sd / "explora", ex_cfg, {"unfreeze_blocks": [-1], "rank": 8}, data=shifted, quiet=True
        )
        after = measure_probe(load(ex.path), shifted, {"method": "linear"}).top1
        full = pretrain_mae(ex_cfg, sd / "mae-continued", source=sd / "mae", data=shifted, quiet=True)
        cont = measure_probe(load(full.path), shifted, {"method": "linear"}).top1
        r["explora"] = {
            "probe_before": before,
            "probe_after_stage1": after,
            "probe_after_full_continued_mae": cont,
            "encoder_trainable": ex.metrics["encoder_trainable_parameters"],
            "encoder_total": ex.metrics["encoder_parameters"],
            "natural_probe_after_stage1": measure_probe(load(ex.path), digits, {"method": "linear"}).top1,
        }
        res["seeds"][seed] = r
        log(json.dumps({seed: r}))
        if (
            "cost" not in res and not args.skip_cost
        ):  # on the first seed's MAE encoder, so a cut-short run still has it
            res["cost"] = measure_cost(digits, sd / "mae")
        res["wall_seconds"] = round(time.time() - t_start)
        if not args.quick:
            from vitkit.io import write_json

            write_json(PARTIAL, res)  # after every seed

    return report(res)


def _ms(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


MEAN_SD = "{mean:.4f} ± {sd:.4f}"


def report(res: dict) -> Output:
    seeds = list(res["seeds"].values())
    col = lambda path: [eval_path(s, path) for s in seeds]  # noqa: E731
    rec: list[dict] = []
    for k in ("val_loss", "val_mean_baseline", "val_position_mean_baseline"):
        rec.append({"table": "mae", "what": k, **_ms(col(("mae", k)))})
    for meth in ("linear", "knn"):
        mae, rnd = _ms(col(("probe", f"mae {meth}"))), _ms(col(("probe", f"random {meth}")))
        rec.append({"table": "probe", "probe": meth, "mae": mae["mean"], "mae_sd": mae["sd"], "random": rnd["mean"],
                    "random_sd": rnd["sd"]})  # fmt: skip
    a, b = col(("labels10", "from_mae")), col(("labels10", "scratch"))
    rec += [{"table": "labels10", "what": "fine-tune from MAE", **_ms(a)},
            {"table": "labels10", "what": "from scratch", **_ms(b)},
            {"table": "labels10", "what": "difference (per seed)", **_ms([x - y for x, y in zip(a, b)])}]  # fmt: skip
    for name in PEFT:
        top1 = _ms(col(("peft", name, "top1")))
        c = (res.get("cost") or {}).get(name) or seeds[0]["peft"][name]  # no cost table: counts from the run
        row = {"table": "peft", "method": name, **top1, "trainable": c["trainable"],
               "share": 100 * c["trainable"] / c["total"]}  # fmt: skip
        if "img_per_s" in c:
            row.update(opt_kib=c["opt_state_bytes"] / 1024, img_s=c["img_per_s"], img_s_min=c["img_per_s_spread"][0],
                       img_s_max=c["img_per_s_spread"][1], vs_full=c["speed_vs_full"])  # fmt: skip
        rec.append(row)
    for k in (
        "probe_before",
        "probe_after_stage1",
        "probe_after_full_continued_mae",
        "natural_probe_after_stage1",
    ):
        rec.append({"table": "explora", "what": k, **_ms(col(("explora", k)))})
    e = seeds[0]["explora"]
    notes = [f"Seeds {list(res['seeds'])} (mean ± sd), digits at 16 px, {MODEL}; wall {res['wall_seconds']} s. "
             f"ExPLoRA stage 1 trains {e['encoder_trainable']:,} of {e['encoder_total']:,} encoder parameters. "
             "Training img/s: methods timed alternately in every round (median, min-max over rounds)."]  # fmt: skip
    tables = [
        Table(name="mae", columns=[("MAE held-out masked-patch loss", "{what}"), ("value", MEAN_SD)]),
        Table(name="probe", columns=[("probe (val top-1)", "{probe}"), ("MAE encoder", "{mae:.4f} ± {mae_sd:.4f}"),
                                     ("random init", "{random:.4f} ± {random_sd:.4f}")]),
        Table(name="labels10", columns=[("10% labels (val top-1)", "{what}"), ("value", MEAN_SD)]),
        Table(name="peft", columns=[("method", "{method}"), ("val top-1", MEAN_SD), ("trainable", "{trainable:,}"),
                                    ("% of total", "{share:.2f}%"), ("optimizer state", "{opt_kib:.1f} KiB"),
                                    ("train img/s (median, min-max)", "{img_s:.0f} ({img_s_min:.0f}-{img_s_max:.0f})"),
                                    ("vs full", "{vs_full:.2f}x")]),
        Table(name="explora", columns=[("ExPLoRA, inverted digits (linear probe val top-1)", "{what}"), ("value", MEAN_SD)]),
    ]  # fmt: skip
    return Output(records=rec, tables=tables, notes=notes, extra=res)


def eval_path(d: dict, path: tuple):
    for p in path:
        d = d[p]
    return d

"""ViT-CoMer vs the plain ViT under the same UperNet head on generated canvases (issue 19, part 4), several
seeds, both arms trained in this process with the same ViT, data, seed and epochs.

    python -m bench dense-comer            # the recorded run
    python -m bench dense-comer --quick    # smoke: one seed, 1 epoch, small sets

The result so far is saved after every arm to bench/out/partial/dense-comer.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VITKIT_PROGRESS", "0")


from bench.dense import (
    COST_TABLE,
    KEEP_SEG,
    MEAN_SD,
    MODEL,
    _ms,
    _options,
    arm_records,
    complete_seeds,
    run_arms,
)
from bench.harness import Output, Table

QUICK = {"seeds": [0], "epochs": 1, "train": 32, "val": 16}
# -- ViT-CoMer vs the plain ViT with the same head ------------------------------------------------------
COMER_ARMS = {"plain-upernet": {}, "vit-comer": {"transforms": ["vit-comer:conv_inplane=16"]}}
COMER_QUICK_NOTE = (
    "ViT-CoMer's pure-PyTorch deformable attention costs ~0.7 s per 64 px image (forward + backward, 1 thread, "
    "AVX2 EPYC) against ~0.02 s for the plain ViT + UperNet: the comparison runs on 32 px canvases of 3 classes."
)


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train", type=int, default=400, help="training canvases")
    p.add_argument("--val", type=int, default=200, help="validation canvases")
    p.add_argument("--size", type=int, default=32, help="canvas side (px)")
    p.add_argument("--classes", type=int, default=3, help="item classes (digits 0..N-1)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=MODEL)


def comer(args) -> Output:
    """Plain ViT + UperNet vs ViT-CoMer + the same UperNet, same ViT, data, seed and epochs."""
    data = f"canvas:size={args.size},classes={args.classes},train={args.train},val={args.val}"
    options = {**_options(args), "classes": args.classes}
    res, seeds = run_arms("dense-comer", args, COMER_ARMS, data, KEEP_SEG, options=options)
    rec = arm_records("seg", COMER_ARMS, seeds, ("miou", "pixel_accuracy", "mean_accuracy"))
    diff = [s["vit-comer"]["miou"] - s["plain-upernet"]["miou"] for s in seeds]
    rec.append({"table": "seg", "arm": "vit-comer - plain (per seed)", "metric": "miou", **_ms(diff)})
    o = res["options"]
    notes = [
        f"{data}, {o['model']} at {o['size']} px, {o['epochs']} epochs, lr {o['lr']}, {o['threads']} threads; "
        f"seeds {complete_seeds(res, COMER_ARMS)} (mean ± sd); wall "
        f"{res.get('wall_seconds', '?')} s. Both arms: the same ViT, UperNet head, data, seed and epochs; "
        "vit-comer (conv_inplane 16) builds the pyramid the head reads.",
        COMER_QUICK_NOTE,
    ]
    tables = [
        Table(name="seg", columns=[("arm", "{arm}"), ("val metric", "{metric}"), ("value", MEAN_SD)]),
        COST_TABLE,
    ]
    return Output(records=rec, tables=tables, notes=notes, extra=res)

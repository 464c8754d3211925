"""Real INT8 (onnxruntime QDQ; PyTorch PT2E + Inductor oneDNN, also int8-mixed-bf16) vs FP32 eager,
bf16 eager (autocast), FP32 / bf16 Inductor and onnxruntime FP32: throughput at batch 1 and 64, and the
accuracy of each deployed graph vs the simulated quantized model.

    python -m bench quant-deploy --run RUN_DIR [--timm vit_small_patch16_224] [--repeats 3] [--threads 2]
        [--no-x86] [--bf16-batches 1] [--compiled-bf16 auto|yes|no]

``--run``: a vitkit run (accuracy on its validation split + speed). ``--timm``: additionally a timm
model with random weights at its own input size (speed only; calibrated on random images, so no
accuracy). Every engine is timed in the same process, interleaved, ``repeats`` times. bf16 eager is
timm's model under ``torch.autocast("cpu", torch.bfloat16)``; on a CPU without AMX it is several times
slower than FP32, so ``--bf16-batches`` limits it to the batch sizes worth waiting for. The compiled
bf16 engines (bf16 Inductor: the float model compiled under bf16 autocast, the strongest float
baseline on an AMX CPU; PT2E int8-mixed-bf16) run by default only where bf16 units exist. The
recorded ``--run bench/out/qrun`` is made by the command in bench/quantization.py's docstring.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import Output, Table, log

QUICK = {"repeats": 1, "min_seconds": 0.1, "no_x86": True, "batches": [1, 4], "bf16_batches": [1]}


def add_arguments(p) -> None:
    p.add_argument(
        "--run", required=True, help="a trained vitkit run (accuracy on its validation split + speed)"
    )
    p.add_argument("--timm", default=None, help="also a timm model with random weights (speed only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=1.5, help="timed seconds per engine per round")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--no-x86", action="store_true", help="skip the PT2E + Inductor engines")
    p.add_argument(
        "--compiled-bf16",
        choices=("auto", "yes", "no"),
        default="auto",
        help="time bf16 Inductor and PT2E int8-mixed-bf16 (auto: where the CPU has AMX / AVX512-BF16)",
    )
    p.add_argument(
        "--bf16-batches", type=int, nargs="*", default=[1, 64], help="batch sizes that time bf16 eager"
    )


def throughput(fn, x, min_seconds: float = 1.5) -> float:
    fn(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def engines(model, images_calib, tmp: Path, method: str = "minmax", x86: bool = True, bf16: bool = True):
    from vitkit.compress.quant import quantize
    from vitkit.deploy.onnx import OnnxModel, export_onnx
    from vitkit.deploy.qdq import export_int8_onnx
    from vitkit.deploy.runtimes import Autocast
    from vitkit.models import model_input_size

    shape = model_input_size(model)
    q = quantize(copy.deepcopy(model), images_calib, method=method, calib_size=len(images_calib))
    export_onnx(model, tmp / "fp32.onnx", shape)
    export_int8_onnx(q, tmp / "int8.onnx", shape)
    eng = {
        "fp32 eager": lambda x: model(x),
        "bf16 eager": Autocast(model),  # the bf16 baseline of `vitkit bench`
        "ort fp32": OnnxModel(tmp / "fp32.onnx", threads=torch.get_num_threads()),
        "ort int8 QDQ": OnnxModel(tmp / "int8.onnx", threads=torch.get_num_threads()),
    }
    if x86:
        from vitkit.deploy.x86 import compile_int8, pt2e_int8

        program = pt2e_int8(model, images_calib)
        # the same Inductor + freezing wrapper on the float model: the fair compiled FP32 / bf16 baselines
        eng["fp32 inductor"] = compile_int8(copy.deepcopy(model))
        eng["pt2e int8 inductor"] = compile_int8(program)
        if bf16:
            eng["bf16 inductor"] = compile_int8(copy.deepcopy(model), bf16=True)
            eng["pt2e int8-mixed-bf16 inductor"] = compile_int8(copy.deepcopy(program), bf16=True)
        eng["_program"] = program
    return q, eng


BASELINES = ("fp32 eager", "ort fp32", "fp32 inductor", "bf16 eager", "bf16 inductor")


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def measure(name, eng, shape, args) -> list[dict]:
    """One record per (batch, engine): median img/s and, per baseline, the median ratio and its min-max."""
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, *shape)
        speed = {
            k: [] for k in eng if not k.startswith("_") and (k != "bf16 eager" or batch in args.bf16_batches)
        }
        with torch.no_grad():
            for k in speed:  # compile (first call per shape) outside the timed loop
                eng[k](x)
            for _ in range(args.repeats):
                for k in speed:  # interleaved
                    speed[k].append(throughput(eng[k], x, args.min_seconds))
        for k, v in speed.items():
            row = {
                "table": "speed",
                "model": name,
                "batch": batch,
                "engine": k,
                "throughput": statistics.median(v),
            }
            for b in BASELINES:
                if b in speed:
                    r = [a / c for a, c in zip(v, speed[b])]
                    row[f"vs_{_slug(b)}"], row[f"vs_{_slug(b)}_min"] = statistics.median(r), min(r)
                    row[f"vs_{_slug(b)}_max"] = max(r)
            log(f"{name} batch {batch} {k}: {row['throughput']:.1f} img/s")
            rows.append(row)
    return rows


def speed_table(repeats: int) -> Table:
    cols = [("model", "{model}"), ("batch", "{batch}"), ("engine", "{engine}"), ("img/s", "{throughput:.1f}")]
    for b in BASELINES:
        s = _slug(b)
        cols.append((f"vs {b}", f"{{vs_{s}:.2f}}x ({{vs_{s}_min:.2f}}-{{vs_{s}_max:.2f}})"))
    title = f"images/s (median of {repeats}; ratios: median (min-max) over the interleaved repeats)"
    return Table(name="speed", title=title, columns=cols)


def run(args) -> Output:
    torch.set_num_threads(args.threads)
    from vitkit.train.precision import bf16_is_fast

    fast = bf16_is_fast(torch.device("cpu"))
    compiled_bf16 = args.compiled_bf16 == "yes" or (args.compiled_bf16 == "auto" and fast)
    notes = [f"bf16 units (AMX / AVX512-BF16): {fast}; VNNI: {torch.cpu._is_vnni_supported()}; "
             f"{args.threads} threads; compiled bf16 engines: {compiled_bf16}."]  # fmt: skip
    records: list[dict] = []

    import vitkit
    from vitkit.api import data_splits_for
    from vitkit.deploy.onnx import OnnxModel
    from vitkit.models import model_input_size
    from vitkit.train import build_config, evaluate
    from vitkit.train.evaluate import eval_transform, predict

    model = vitkit.load(args.run)
    shape = model_input_size(model)
    splits = data_splits_for(build_config(f"{args.run}/config.yaml"), shape[1])
    with tempfile.TemporaryDirectory() as d:
        from vitkit.compress.quant.config import make_config
        from vitkit.compress.quant.transform import calibration_images

        calib = calibration_images(model, splits.train, make_config())  # what quantize() itself uses
        q, eng = engines(model, calib, Path(d), x86=not args.no_x86, bf16=compiled_bf16)
        sim = predict(q, splits.val)
        x = eval_transform(q).images(splits.val.images)
        got = OnnxModel(Path(d) / "int8.onnx")(x)
        fp = evaluate(model, splits.val)["top1"]
        records.append({"table": "accuracy", "engine": "fp32 (PyTorch)", "top1": fp})
        records.append({"table": "accuracy", "engine": "simulated W8A8 minmax", "top1": evaluate(q, splits.val)["top1"],
                        "agreement": 1.0})  # fmt: skip
        records.append({"table": "accuracy", "engine": "onnxruntime INT8 QDQ",
                        "top1": float((got.argmax(1) == splits.val.targets).float().mean()),
                        "agreement": float((got.argmax(1) == sim.argmax(1)).float().mean())})  # fmt: skip
        if not args.no_x86:
            with torch.no_grad():
                for k in ("_program", "pt2e int8 inductor", "pt2e int8-mixed-bf16 inductor"):
                    if k not in eng:  # the mixed-bf16 engine exists only with compiled bf16
                        continue
                    y = torch.cat([eng[k](x[i : i + 64]) for i in range(0, len(x), 64)])
                    records.append({"table": "accuracy", "engine": k.strip("_"),
                                    "top1": float((y.argmax(1) == splits.val.targets).float().mean()),
                                    "agreement": float((y.argmax(1) == sim.argmax(1)).float().mean())})  # fmt: skip
        records += measure(Path(args.run).name, eng, shape, args)
    if args.timm:
        m = vitkit.create_model(args.timm, num_classes=10)
        m.eval()
        shape = model_input_size(m)
        calib = torch.randn(32, *shape)
        with tempfile.TemporaryDirectory() as d:
            _, eng = engines(m, calib, Path(d), x86=not args.no_x86, bf16=compiled_bf16)
            records += measure(args.timm, eng, shape, args)
    tables = [
        Table(name="accuracy", title=f"accuracy on the validation split of {args.run} (agreement: top-1 with the "
              "simulated quantized model)", columns=[("engine", "{engine}"), ("top-1", "{top1:.4f}"),
                                                      ("agreement", "{agreement:.4f}")]),
        speed_table(args.repeats),
    ]  # fmt: skip
    return Output(records=records, tables=tables, notes=notes)

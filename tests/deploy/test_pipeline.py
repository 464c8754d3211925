"""Pipelines: verbs discovered from the CLI, validated before anything runs, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitkit.cli import main
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.pipeline import load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, stages, workdir=None):
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump({"workdir": str(workdir or tmp_path / "work"), "stages": stages}))
    return p


TRAIN = {"stage": "train", "name": "base", "model": "vitkit_nano_p4_16", "data": "digits",
         "epochs": 2, "lr": 3e-3, "quiet": True}  # fmt: skip
INT8 = {"stage": "int8", "images": 1000}
BENCH = {"stage": "bench", "threads": 1, "repeats": 2, "batch": 4, "latency_calls": 2, "memory": False}


def test_pipeline_runs_then_skips_unchanged_stages(tmp_path):
    p = _write(tmp_path, [TRAIN, INT8, BENCH])
    log: list[str] = []
    first = run_pipeline(p, echo=log.append)
    assert [o.status for o in first] == ["ran"] * 3
    work = tmp_path / "work"
    assert (work / "base" / "model.int8.onnx").is_file() and (work / "base" / "bench.json").is_file()
    weights = (work / "base" / "model.safetensors").stat().st_mtime_ns
    again = run_pipeline(p, echo=log.append)
    assert [o.status for o in again] == ["skipped"] * 3
    assert (work / "base" / "model.safetensors").stat().st_mtime_ns == weights
    # a changed field reruns that stage only
    p = _write(tmp_path, [TRAIN, INT8, {**BENCH, "repeats": 3}])
    third = run_pipeline(p, echo=log.append)
    assert [o.status for o in third] == ["skipped", "skipped", "ran"]
    assert read_json(work / "base" / "bench.json")["config"]["repeats"] == 3
    # the record holds a hash of the arguments and of the input run's weights
    rec = read_json(work / ".pipeline" / "int8.json")
    assert rec["argv"][:2] == ["export", str(work / "base")] and len(rec["key"]) == 64
    # the demo's final table reads the same files
    from vitkit.demo import demo_table

    rows = demo_table(work / "base")
    assert [r["stage"] for r in rows] == ["train: torch fp32", "baseline: timm fp32", "export: onnx fp32",
                                          "int8: onnx int8"]  # fmt: skip
    assert rows[0]["speedup_throughput"] == 1.0 and all(r["latency_ms"] > 0 for r in rows)
    assert rows[2]["accuracy"] == read_json(work / "base" / "export.json")["top1_onnx"]
    assert abs(rows[2]["accuracy"] - rows[0]["accuracy"]) < 0.01  # all 359 held-out images, both


@pytest.mark.parametrize(
    "stages,message",
    [
        ([TRAIN, {"stage": "sharpen"}], "unknown stage 'sharpen' (known: "),
        ([TRAIN, {"stage": "export", "int9": "dynamic"}], "unknown field 'int9' for `vitkit export`"),
        ([TRAIN, {**BENCH, "repeats": "many"}], "option 'repeats': Input should be a valid integer"),
        ([{"stage": "export"}], "no earlier stage produces one"),
        ([TRAIN, {"stage": "bench", "input": "teacher"}], "input 'teacher' is not the output of an earlier"),
        (
            [TRAIN, {"stage": "train", "name": "b2", "pretrained_file": "{cnn}/model.safetensors"}],
            "'{cnn}' names no earlier run-producing stage",
        ),
        ([TRAIN, {**TRAIN}], "another stage is already named 'base'"),
        ([TRAIN, {"stage": "export", "input": ["base", "base"]}], "takes 1–1 input runs (run)"),
    ],
)
def test_errors_are_reported_before_any_stage_runs(tmp_path, capsys, stages, message):
    p = _write(tmp_path, stages)
    code = main(["pipeline", str(p)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2 and message in text and "Traceback" not in text, text
    assert not (tmp_path / "work").exists()  # nothing ran


def test_bad_files(tmp_path):
    with pytest.raises(VitkitError, match="does not exist"):
        load_pipeline(tmp_path / "none.yaml")
    (tmp_path / "a.yaml").write_text("stages: [\n")
    with pytest.raises(VitkitError, match="not valid YAML"):
        load_pipeline(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("steps: []\n")
    with pytest.raises(VitkitError, match="non-empty 'stages' list"):
        load_pipeline(tmp_path / "b.yaml")


def test_examples_validate_and_demo_yaml_is_the_demo():
    from vitkit.demo import demo_pipeline

    for f in sorted((ROOT / "examples").glob("*.yaml")):
        load_pipeline(f)
    assert yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text()) == demo_pipeline("runs/demo")


# the demo with tiny settings (the stages and files of `vitkit demo`, seconds instead of minutes)
TINY_DEMO = dict(teacher="test_resnet", teacher_epochs=2, epochs=4, finetune=1, attack_n=32, batch=4,
                 latency_calls=2, repeats=2)  # fmt: skip


@pytest.mark.slow  # 11 stages: 210 s at load ~4 on 2 cores (over the ~60 s budget; not yet profiled)
def test_demo_pipeline_every_stage_in_the_table(tmp_path):
    from vitkit.demo import demo_pipeline, demo_stage_table, run_demo_pipeline

    work = tmp_path / "demo"
    log: list[str] = []
    rows = run_demo_pipeline(work, echo=log.append, **TINY_DEMO)
    n_stages = len(demo_pipeline(work)["stages"])
    assert len(list((work / ".pipeline").glob("*.json"))) == n_stages  # every stage completed
    assert [r["stage"].split(":")[0] for r in rows] == ["teacher", "baseline", "baseline", "distill", "export",
                                                        "int8", "reduce-tokens", "reduce-tokens", "w8a8", "w4a4",
                                                        "attack"]  # fmt: skip
    by = {r["stage"].split(":")[0] + (":onnx" if "onnx fp32" in r["stage"] else "")
          + (":bf16" if "bf16" in r["stage"] else ""): r for r in rows}  # fmt: skip
    # every stage that deploys has accuracy, size, latency and a speedup vs the FP32 and bf16 baselines
    for r in rows[:-1]:
        assert r["latency_ms"] > 0 and r["speedup_latency"] > 0 and r["speedup_throughput"] > 0, r
        assert r["speedup_throughput_bf16"] > 0, r
        if r is not by["baseline:bf16"]:  # timed only (its accuracy is not evaluated)
            assert 0 < r["accuracy"] <= 1 and r["size_mb"] > 0, r
    assert (
        by["baseline"]["speedup_throughput"] == 1.0 and by["baseline:bf16"]["speedup_throughput_bf16"] == 1.0
    )
    assert by["teacher"]["accuracy"] > 0.5  # the CNN teacher learns the digits in 2 epochs
    # the ONNX graphs compute what PyTorch computes (same held-out images)
    assert abs(by["export:onnx"]["accuracy"] - by["distill"]["accuracy"]) < 0.01
    assert abs(by["reduce-tokens:onnx"]["accuracy"] - by["reduce-tokens"]["accuracy"]) < 0.01
    q8 = read_json(work / "w8a8" / "quant.json")
    assert q8["simulated"] is False and q8["onnx_vs_simulated_agreement"] > 0.95
    assert (work / "w8a8" / "model_int8.onnx").is_file()
    assert abs(by["w8a8"]["accuracy"] - by["reduce-tokens"]["accuracy"]) < 0.05
    assert by["w4a4"]["size_mb"] < by["distill"]["size_mb"] / 4  # 4-bit weights (simulated)
    # the token-reduced run has fewer FLOPs than its baseline; the W8A8 bench has the QDQ graph
    red = read_json(work / "reduced" / "bench.json")["results"]
    assert red["vitkit fp32 eager"]["flops"] < red["timm fp32 eager"]["flops"]
    assert "onnxruntime int8 qdq" in read_json(work / "w8a8" / "bench.json")["results"]
    # the PGD attack: robust accuracy below clean, in the report
    attack = read_json(work / "vit" / "attack-pgd" / "attack.json")["results"]
    pgd = next(r for r in attack if r["method"] == "pgd")
    assert by["attack"]["accuracy"] == pgd["robust_accuracy"] <= pgd["clean_accuracy"]
    html = (work / "report.html").read_text()
    assert "robustness" in html and "evit" in html and "quantize" in html
    # everything unchanged: a second run skips every stage and gives the same accuracies
    log.clear()
    again = run_demo_pipeline(work, echo=log.append, **TINY_DEMO)
    assert sum("unchanged, skipped" in m for m in log) == n_stages
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    assert demo_stage_table(work) == again

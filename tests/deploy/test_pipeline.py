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
        ([TRAIN, {**BENCH, "repeats": "many"}], "field 'repeats' must be int, got 'many'"),
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

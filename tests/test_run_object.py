"""The Run object: a run directory read once, and new runs derived from it."""

from __future__ import annotations

import pytest
import torch

from vitkit.api import data_splits_for
from vitkit.errors import VitkitError
from vitkit.io import read_json
from vitkit.runs import Run, load


def test_open_reads_what_the_run_holds(trained_run):
    run = Run.open(trained_run)
    model = run.model()
    assert run.model() is model  # built once
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), load(trained_run)(x))
    assert run.config.data == "digits" and run.task in ("multiclass", "classification")
    assert len(run.classes) == 10 and run.transforms == []
    val = run.data("val")
    ref = data_splits_for(run.config, 16).val
    assert torch.equal(val.images, ref.images) and torch.equal(val.targets, ref.targets)
    assert run.fp32_val_metric("top1") == pytest.approx(read_json(trained_run / "metrics.json")["top1"])


def test_derive_writes_a_complete_run_or_nothing(trained_run, tmp_path):
    run = Run.open(trained_run)
    child = run.derive(tmp_path / "child", run.model(), {"top1": 0.5}, {"note.json": {"a": 1}, "x.txt": "hi"})
    assert (child.path / "config.yaml").read_text() == (trained_run / "config.yaml").read_text()
    assert child.metrics == {"top1": 0.5} and read_json(child.path / "note.json") == {"a": 1}
    assert child.classes == run.classes and child.config.data == run.config.data

    def broken(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run.derive(tmp_path / "failed", run.model(), {}, {"plot.png": broken})
    assert not (tmp_path / "failed").exists()
    with pytest.raises(VitkitError, match="is the source run"):
        run.derive(trained_run, run.model(), {})


def test_quantize_reads_the_run_once_and_reuses_its_fp32_accuracy(trained_run, tmp_path, monkeypatch):
    import vitkit.runs as runs
    from vitkit.stages.quantize import quantize_run

    reads: list[str] = []
    original = runs.read_run
    monkeypatch.setattr(runs, "read_run", lambda p: reads.append(str(p)) or original(p))
    summary, out = quantize_run(trained_run, tmp_path / "q", w_bits=8, a_bits=8, calib_size=32)
    assert reads.count(str(trained_run)) == 1  # the source model.json: read once for the whole stage
    assert summary["fp32_top1"] == read_json(trained_run / "metrics.json")["top1"]
    assert Run.open(out).transforms == ["quantize"]


def _count_reads(monkeypatch) -> list[str]:
    import vitkit.runs as runs

    reads: list[str] = []
    original_read, original_model = runs.read_run, runs._model_of
    monkeypatch.setattr(runs, "read_run", lambda p: reads.append(f"read {p}") or original_read(p))
    monkeypatch.setattr(
        runs, "_model_of", lambda info, d: reads.append(f"model {info.path}") or original_model(info, d)
    )
    return reads


@pytest.mark.parametrize("stage", ["evaluate", "export", "bench", "reduce-tokens", "prune"])
def test_stages_read_their_input_run_once(trained_run, tmp_path, monkeypatch, stage):
    """model.json read once and the model built once per stage (Run.open, not read_run + load + ...)."""
    from vitkit import api
    from vitkit.deploy import BenchConfig

    reads = _count_reads(monkeypatch)
    if stage == "evaluate":
        api.evaluate_run(trained_run, output=tmp_path / "eval")
    elif stage == "export":
        api.export_run(trained_run, images=16)
    elif stage == "bench":
        api.bench_run(trained_run, BenchConfig(threads=1, repeats=1, warmup=1, latency_calls=1, throughput_batch=2),
                      baseline=False, onnx=False, memory=False)  # fmt: skip
    elif stage == "reduce-tokens":
        api.reduce_tokens_run(trained_run, tmp_path / "tome", method="tome", r=2)
    else:
        api.prune_run(trained_run, tmp_path / "pruned", heads=0.25)
    assert reads.count(f"read {trained_run}") == 1, reads
    assert sum(r.startswith("model ") for r in reads) == 1, reads


def test_eval_data_is_the_own_val_split_or_other_data_of_the_same_classes(trained_run, tmp_path):
    import numpy as np

    run = Run.open(trained_run)
    assert run.eval_data() is run.data("val")  # loaded once, shared
    assert run.eval_data("digits") is run.data("val")  # its own training data: the validation split
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "three.npz", x=rng.integers(0, 255, (30, 16, 16), dtype=np.uint8), y=np.arange(30) % 3
    )
    with pytest.raises(VitkitError, match="num_classes mismatch"):
        run.eval_data(f"npz:{tmp_path / 'three.npz'}", 16)
    other = run.eval_data(f"npz:{tmp_path / 'three.npz'}", 16, same_classes=False)
    assert len(other) == 30 and other.num_classes == 3
